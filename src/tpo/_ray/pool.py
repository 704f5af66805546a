"""Replicas of one model as Ray actors: starting them, spreading calls over them, surviving their loss.

The ``ray:`` plugins (``tpo.backends.ray_replicas``, ``tpo.rewards.ray_replicas``) are thin
shells over ``ActorPool``. What Ray does, Ray does: placing actors on nodes with the GPUs
they ask for, restarting a dead one up to ``max_restarts`` times, shipping requests and
results. What the pool adds is the part Ray cannot know:

* **Spreading a batch.** A batch is cut into chunks balanced by estimated tokens, largest
  requests first, each chunk a fraction of what is left (guided self-scheduling): large
  chunks while there is much to do, small ones at the end, so no replica sits idle while
  another works through a long tail. Each replica has one chunk at a time. A non-batching
  model gets each request on its own, sent to the replica with the fewest tokens in flight.
* **Losing a replica.** A chunk whose actor died (node lost, ``ray.kill``, out of memory)
  goes back to the front of the queue, for the other replicas; the lost replica is probed
  until Ray has restarted it, then takes work again. Requests carry their seeds, so a
  deterministic model answers the same wherever a request lands. When no replica is left
  and none is restarting, the call fails naming each replica and its last error.
* **Failing fast.** Every replica builds its model before the pool is returned; a replica
  that cannot (bad model path, missing extra, no GPU) raises its own error, and a cluster
  with no node able to hold one replica is refused before any actor is started.

Ray is imported only here, and only when a pool is started.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NoReturn

from ..errors import BackendError, ConfigError, MissingDependencyError, RewardError, RunError, TPOError
from ..options import PluginOptions, integer, mapping, number, option, string
from ..registry import BACKENDS_GROUP, REWARDS_GROUP, load_plugin, split_spec
from ..types import ReplicaReport
from .actor import Kind, ReplicaActor

__all__ = ["ActorPool", "RayOptions", "import_ray", "next_chunk", "split_ray_options"]

#: Seconds between probes of a replica that Ray is restarting.
PROBE_INTERVAL_S = 0.5
#: A batch is cut into chunks of about ``left / (CHUNK_FRACTION * replicas)`` tokens.
CHUNK_FRACTION = 2
#: ...but never into more than about this many chunks per replica (each costs a round trip).
MAX_CHUNKS_PER_REPLICA = 8

State = Literal["up", "restarting", "dead"]

#: The error a pool of each kind raises for a failure of its own (not the model's).
_ERRORS: dict[Kind, type[RunError]] = {"policy": BackendError, "reward": RewardError}


@dataclass(frozen=True)
class RayOptions(PluginOptions):
    """The options of the ``ray:`` wrapper; every other option goes to the model it replicates."""

    owner: ClassVar[str] = "ray"

    replicas: int = option(1, integer(min=1), "actors, each holding its own copy of the model", affects_results=False)
    num_gpus: float = option(
        0.0, number(0), "GPUs each replica reserves (e.g. its tensor_parallel_size)", affects_results=False
    )
    num_cpus: float | None = option(
        None, number(0), "CPUs each replica reserves (default: Ray's, none held)", affects_results=False
    )
    max_restarts: int = option(
        3, integer(min=-1), "times Ray restarts a replica that died (-1: no limit)", affects_results=False
    )
    runtime_env: Mapping[str, Any] | None = option(
        None,
        mapping(),
        "Ray runtime environment of the replicas (env_vars, pip, working_dir, ...)",
        affects_results=False,
    )
    ray_address: str | None = option(
        None,
        string(),
        "the Ray cluster to join: auto, HOST:PORT or ray://HOST:10001 (default: RAY_ADDRESS, else a local instance)",
        affects_results=False,
    )
    start_timeout_s: float = option(
        1800.0,
        number(0, min_open=True),
        "seconds the replicas may take to be placed and build their model",
        affects_results=False,
    )
    restart_timeout_s: float = option(
        900.0,
        number(0, min_open=True),
        "seconds to wait for a restarting replica when no other is left",
        affects_results=False,
    )


def split_ray_options(options: Mapping[str, Any]) -> tuple[RayOptions, dict[str, Any]]:
    """The wrapper's own options (checked) and the rest, for the inner model."""
    names = set(RayOptions.names())
    ours = {k: v for k, v in options.items() if k in names}
    return RayOptions.from_options(ours), {k: v for k, v in options.items() if k not in names}


def import_ray() -> Any:
    """The ``ray`` module, or ``MissingDependencyError`` naming the extra."""
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError("ray", "ray", "The ray: wrapper") from e
    return ray


def next_chunk(pending: deque[int], costs: Sequence[float], replicas: int, cap: int | None) -> list[int]:
    """Take the next chunk from the front of ``pending`` (indices, largest cost first).

    A chunk holds about ``1 / (CHUNK_FRACTION * replicas)`` of the cost left, at least one
    request, no more than ``cap``, and no less than ``1 / MAX_CHUNKS_PER_REPLICA`` of a fair share
    of the requests left (so a long tail of tiny requests is not sent one round trip each).
    With one replica up, the chunk is everything left (up to ``cap``).
    """
    if replicas <= 1:  # nobody to share with: one call, as few round trips as the cap allows
        return [pending.popleft() for _ in range(min(len(pending), cap or len(pending)))]
    left = sum(costs[i] for i in pending)
    target = left / (CHUNK_FRACTION * replicas)
    at_least = max(1, len(pending) // (replicas * MAX_CHUNKS_PER_REPLICA))
    chunk: list[int] = []
    taken = 0.0
    while pending and (cap is None or len(chunk) < cap) and (len(chunk) < at_least or taken < target):
        i = pending.popleft()
        chunk.append(i)
        taken += costs[i]
    return chunk


class _ReplicaLost(Exception):
    """Internal: the actor of a replica is gone (for now); its chunk goes to another."""


@dataclass
class _Replica:
    index: int
    actor: Any
    host: str
    pid: int
    state: State = "up"
    in_flight: float = 0.0
    requests: int = 0
    sequences: int = 0
    failures: int = 0
    last_error: str | None = None
    probe: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return f"{self.index + 1} ({self.host}, pid {self.pid})"


class ActorPool:
    """Replicas of one model as Ray actors; see the module docstring. Built by ``ActorPool.start``."""

    def __init__(
        self, ray: Any, kind: Kind, spec: str, options: RayOptions, replicas: list[_Replica], info: Mapping[str, Any]
    ) -> None:
        self._ray = ray
        self.kind = kind
        self.spec = spec
        self.options = options
        self._replicas = replicas
        #: The model's description, from the first replica (``ReplicaActor.describe``).
        self.info = dict(info)
        self._error = _ERRORS[kind]
        self._closed = False

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, kind: Kind, spec: str, options: Mapping[str, Any]) -> ActorPool:
        """Start the actors of ``spec`` and wait until each has built its model; raise the first build error."""
        ray_opts, inner = split_ray_options(options)
        spec = _check_inner_spec(kind, spec, inner)
        ray = import_ray()
        _connect(ray, ray_opts.ray_address)
        _check_placeable(ray, ray_opts)
        actor_cls = ray.remote(ReplicaActor).options(**_actor_options(ray_opts))
        actors = [actor_cls.remote(kind, spec, inner) for _ in range(ray_opts.replicas)]
        try:
            infos = _wait_built(ray, actors, ray_opts.start_timeout_s, kind, spec)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        replicas = [
            _Replica(i, actor, str(d["host"]), int(d["pid"]))
            for i, (actor, d) in enumerate(zip(actors, infos, strict=True))
        ]
        windows = [d["context_window"] for d in infos if d.get("context_window")]
        return cls(ray, kind, spec, ray_opts, replicas, {**infos[0], "context_window": min(windows, default=None)})

    # ------------------------------------------------------------------ calls

    async def run(
        self, method: str, items: Sequence[Any], costs: Sequence[float], sequences: Callable[[Any], int]
    ) -> list[Any]:
        """``method`` over ``items``, results in order: in chunks for a batching model, else one call per item."""
        if self.info["batching"]:
            return await self._run_batch(method, items, costs, sequences)
        calls = [self._run_one(method, x, c, sequences(x)) for x, c in zip(items, costs, strict=True)]
        return list(await asyncio.gather(*calls))

    async def _run_batch(
        self, method: str, items: Sequence[Any], costs: Sequence[float], sequences: Callable[[Any], int]
    ) -> list[Any]:
        """``method`` over ``items``, spread over the replicas in chunks; results in order."""
        if not items:
            return []
        self._check_open()
        results: list[Any] = [None] * len(items)
        pending = deque(sorted(range(len(items)), key=lambda i: -costs[i]))
        running: dict[asyncio.Task[list[Any]], tuple[_Replica, list[int]]] = {}
        cap = self.info.get("max_batch_size") or None
        failure: BaseException | None = None
        try:
            while pending or running:
                up = self._up()
                busy = {id(rep) for rep, _ in running.values()}
                idle = [rep for rep in up if id(rep) not in busy]
                while idle and pending and failure is None:
                    rep = min(idle, key=lambda r: r.in_flight)
                    idle.remove(rep)
                    chunk = next_chunk(pending, costs, len(up), cap)
                    cost = sum(costs[i] for i in chunk)
                    batch = [items[i] for i in chunk]
                    task = asyncio.ensure_future(self._call(rep, method, batch, cost, sum(map(sequences, batch))))
                    running[task] = (rep, chunk)
                if not running:
                    if failure is not None:
                        break
                    await self._await_any_replica()
                    continue
                done, _ = await asyncio.wait(running, timeout=self._recheck_s(), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    rep, chunk = running.pop(task)
                    try:
                        out = task.result()
                    except _ReplicaLost:
                        pending.extendleft(reversed(chunk))  # first in line for the others
                        continue
                    except Exception as e:  # the model's own failure: no more chunks; the running ones finish
                        failure = failure or e
                        continue
                    for i, result in zip(chunk, out, strict=True):
                        results[i] = result
        finally:
            for task in running:
                task.cancel()
        if failure is not None:
            raise failure
        return results

    async def _run_one(self, method: str, item: Any, cost: float, sequences: int) -> Any:
        """``method`` on one item, at the replica with the fewest tokens in flight; re-sent if that replica is lost."""
        self._check_open()
        while True:
            up = self._up()
            if not up:
                await self._await_any_replica()
                continue
            rep = min(up, key=lambda r: r.in_flight)
            try:
                return (await self._call(rep, method, [item], cost, sequences))[0]
            except _ReplicaLost:
                continue

    async def preflight(self) -> None:
        """Each replica's own pre-flight check, when the model has one."""
        if self.info.get("preflights"):
            await asyncio.gather(*(self._unwrap(rep.actor.preflight.remote()) for rep in self._up()))

    async def aclose(self) -> None:
        """Let each replica release its model, then end the actors; idempotent."""
        if self._closed:
            return
        self._closed = True
        for rep in self._replicas:
            if rep.probe is not None:
                rep.probe.cancel()
        live = [rep for rep in self._replicas if rep.state != "dead"]
        if live:
            await asyncio.wait([asyncio.ensure_future(self._close_one(rep)) for rep in live], timeout=30)
        for rep in self._replicas:
            self._ray.kill(rep.actor, no_restart=True)

    def reports(self) -> list[ReplicaReport]:
        """Each replica's share of the work so far."""
        return [
            ReplicaReport(rep.label, rep.state, rep.requests, rep.sequences, rep.failures, rep.last_error)
            for rep in self._replicas
        ]

    # ------------------------------------------------------------------ internals

    def _up(self) -> list[_Replica]:
        """The replicas up now, after starting the probes of those restarting (``_start_probes``)."""
        self._start_probes()
        return [rep for rep in self._replicas if rep.state == "up"]

    def _start_probes(self) -> None:
        """Probe each restarting replica that has no probe running (in this event loop)."""
        for rep in self._replicas:
            if rep.state == "restarting" and (rep.probe is None or rep.probe.done()):
                rep.probe = asyncio.ensure_future(self._probe(rep))

    def _recheck_s(self) -> float | None:
        # While a replica is restarting, look every so often whether it is back, to give it work.
        return PROBE_INTERVAL_S if any(rep.state == "restarting" for rep in self._replicas) else None

    async def _call(self, rep: _Replica, method: str, batch: list[Any], cost: float, sequences: int) -> list[Any]:
        rep.in_flight += cost
        try:
            out = await self._unwrap(getattr(rep.actor, method).remote(batch), rep)
        finally:
            rep.in_flight -= cost
        if not isinstance(out, list) or len(out) != len(batch):
            got = f"{len(out)} results" if isinstance(out, list) else type(out).__name__
            raise self._error(f"ray: replica {rep.label} of {self.spec} returned {got} for {len(batch)} requests")
        rep.requests += len(batch)
        rep.sequences += sequences
        return out

    async def _unwrap(self, ref: Any, rep: _Replica | None = None) -> Any:
        """Await an actor call; the model's error as itself, the actor's loss as ``_ReplicaLost``."""
        exceptions = self._ray.exceptions
        try:
            return await ref
        except exceptions.RayTaskError as e:  # raised by the model, inside the actor
            _raise_task_error(e, self._error, f"ray: {self.spec} failed on replica {rep.label if rep else '?'}")
        except exceptions.RayError as e:  # the actor died, is restarting, or its node was lost
            if rep is None:
                raise self._error(f"ray: a replica of {self.spec} was lost: {_first_line(e)}") from e
            self._lost(rep, e)
            raise _ReplicaLost from e

    def _lost(self, rep: _Replica, error: BaseException) -> None:
        rep.failures += 1
        rep.last_error = _first_line(error)
        if rep.state == "up":
            # Until a probe hears otherwise from Ray: a restart may be on its way (max_restarts).
            rep.state = "restarting"
        self._start_probes()

    async def _probe(self, rep: _Replica) -> None:
        """Ask a lost replica every PROBE_INTERVAL_S whether Ray has restarted it; stop when Ray says it is dead."""
        exceptions = self._ray.exceptions
        while rep.state == "restarting" and not self._closed:
            try:
                await rep.actor.ready.remote()
            except exceptions.ActorDiedError as e:
                rep.state, rep.last_error = "dead", _first_line(e)
                return
            except exceptions.RayError as e:
                rep.last_error = _first_line(e)
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            except Exception as e:  # the model failed to build again after the restart
                rep.state, rep.last_error = "dead", f"{type(e).__name__}: {e}"
                return
            rep.state = "up"
            return

    async def _await_any_replica(self) -> None:
        """Wait for a restarting replica to come back; fail naming every replica when none can."""
        deadline = time.monotonic() + self.options.restart_timeout_s
        while not self._up():
            restarting = [rep for rep in self._replicas if rep.state == "restarting"]
            if not restarting or time.monotonic() > deadline:
                raise self._error(self._none_left())
            await asyncio.wait([rep.probe for rep in restarting if rep.probe is not None], timeout=PROBE_INTERVAL_S)

    def _none_left(self) -> str:
        lines = "; ".join(
            f"replica {rep.label}: {rep.state}, last error: {rep.last_error or 'none'}" for rep in self._replicas
        )
        return f"ray: no replica of {self.spec} is left ({lines})"

    async def _close_one(self, rep: _Replica) -> None:
        try:
            await rep.actor.close.remote()
        except Exception:  # noqa: S110 - the actor is ended next regardless
            pass

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"ray: the replicas of {self.spec} were closed (aclose); build the model again")


# ---------------------------------------------------------------------- starting


def _check_inner_spec(kind: Kind, spec: str, inner: Mapping[str, Any]) -> str:
    """The spec to replicate, checked as far as this process can: a name, not ``ray`` itself, its options."""
    what = "--policy ray:vllm:MODEL" if kind == "policy" else "--reward ray:hf:MODEL"
    if not spec.strip():
        raise ConfigError(f"ray: needs the spec of the model to replicate after 'ray:', e.g. {what}")
    name, _ = split_spec(spec)
    if name == "ray":
        raise ConfigError(f"ray:{spec} replicates a wrapper of replicas; give the model's own spec, e.g. {what}")
    group = BACKENDS_GROUP if kind == "policy" else REWARDS_GROUP
    try:
        cls = load_plugin(group, name)
    except (ConfigError, ImportError):
        # Not installed here: the plugin or its extra may be on the cluster's nodes only (or come with
        # runtime_env). The replicas build it, or say what is wrong, before any work.
        return spec.strip()
    if getattr(cls, "uses_policy", False):
        raise ConfigError(
            f"ray:{spec}: the {name} reward uses the run's policy, which stays in this process; replicate the "
            f"model it calls instead, e.g. --reward {name}:ray:vllm:MODEL"
        )
    options_class = getattr(cls, "options_class", None)
    if isinstance(options_class, type) and issubclass(options_class, PluginOptions):
        options_class.from_options(inner)  # a misspelt option fails here, before any actor starts
    return spec.strip()


def _connect(ray: Any, address: str | None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), or start a local instance; a connected process stays so."""
    if ray.is_initialized():
        return
    # ray.init installs a SIGTERM handler of its own; tpo batch has one that stops cleanly (exit 143).
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "Ray (RAY_ADDRESS, else a local instance)"
        raise ConfigError(f"ray: cannot connect to {where}: {_first_line(e)}") from e
    finally:
        if main_thread and on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


def _check_placeable(ray: Any, opts: RayOptions) -> None:
    """Refuse at once a replica no node of the cluster can hold (more GPUs or CPUs than any node has)."""
    wanted = {"GPU": opts.num_gpus, "CPU": opts.num_cpus or 0.0}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes or any(all(r.get(k, 0.0) >= v for k, v in wanted.items()) for r in nodes):
        return
    most = {k: max(r.get(k, 0.0) for r in nodes) for k in wanted}
    raise ConfigError(
        f"ray: no node of the cluster can hold a replica with num_gpus={opts.num_gpus:g}"
        + (f", num_cpus={opts.num_cpus:g}" if opts.num_cpus else "")
        + f"; the most any node has is {most['GPU']:g} GPUs and {most['CPU']:g} CPUs"
    )


def _actor_options(opts: RayOptions) -> dict[str, Any]:
    out: dict[str, Any] = {
        "num_gpus": opts.num_gpus,
        "max_restarts": opts.max_restarts,
        # A call to a lost actor fails at once and the pool sends its requests elsewhere; Ray retrying
        # it on the restarted actor would hold them until the model is loaded again.
        "max_task_retries": 0,
    }
    if opts.num_cpus is not None:
        out["num_cpus"] = opts.num_cpus
    if opts.runtime_env:
        out["runtime_env"] = dict(opts.runtime_env)
    return out


def _wait_built(ray: Any, actors: list[Any], timeout_s: float, kind: Kind, spec: str) -> list[dict[str, Any]]:
    """Each actor's description once it has built its model; the first build error as itself."""
    refs = [actor.describe.remote() for actor in actors]
    _, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    error = _ERRORS[kind]
    infos: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        if ref in waiting:
            continue
        try:
            infos.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            _raise_task_error(e, error, f"ray: replica {i + 1} of {len(refs)} cannot build {spec}")
        except ray.exceptions.RayError as e:
            raise error(f"ray: replica {i + 1} of {len(refs)} of {spec} died while starting: {_first_line(e)}") from e
    if waiting:
        raise error(
            f"ray: {len(waiting)} of {len(refs)} replicas of {spec} were not placed and built within "
            f"{timeout_s:g} s (start_timeout_s); does the cluster have the GPUs and CPUs they ask for?"
        )
    return infos


def _raise_task_error(e: BaseException, error: type[RunError], context: str) -> NoReturn:
    """Raise the model's own error from inside an actor: a ``TPOError`` as itself, any other wrapped in ``error``.

    ``e`` is Ray's ``RayTaskError``, whose ``cause`` is what the model raised; the wrapping
    error's message is ``context`` and that cause.
    """
    cause = getattr(e, "cause", None)
    if isinstance(cause, TPOError):
        raise cause from None
    shown = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(e)
    raise error(f"{context}: {shown}") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
