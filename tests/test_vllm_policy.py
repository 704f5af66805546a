"""The vLLM policy backend, against a stand-in ``vllm`` module that records what it is handed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

import tpo
from stubs import load_stub
from tpo.backends.vllm_local import VLLMPolicy
from tpo.errors import BackendError, ConfigError, MissingDependencyError
from tpo.registry import policy_from_spec
from tpo.testing import FunctionReward
from tpo.types import GenerationRequest, Message, SamplingParams

vllm_stub = load_stub("tpo_tests_vllm_stub", "vllm_stub.py")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    return vllm_stub.install(monkeypatch)


def _request(text: str, *, n: int = 1, system: str | None = None, **sampling: Any) -> GenerationRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    logprobs = sampling.pop("logprobs", None)
    return GenerationRequest(messages, n=n, sampling=SamplingParams(**sampling), logprobs=logprobs, purpose="sample")


# ---------------------------------------------------------------------------- engine arguments


def test_engine_arguments_reach_vllm_exactly(fake: Any) -> None:
    policy = VLLMPolicy.from_spec(
        "org/model-7b",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.85,
        max_model_len=8192,
        dtype="bfloat16",
        seed=11,
        trust_remote_code=True,
        engine_args={"max_num_seqs": 64, "enforce_eager": True},
    )
    [engine] = fake.engines
    assert engine.model == "org/model-7b"
    assert engine.engine_args == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 8192,
        "dtype": "bfloat16",
        "seed": 11,
        "trust_remote_code": True,
        "enable_prefix_caching": True,
        "max_num_seqs": 64,
        "enforce_eager": True,
    }
    assert policy.name == "vllm:org/model-7b"
    assert asyncio.run(policy.context_window()) == 8192


def test_defaults_leave_vllm_its_own_but_turn_prefix_caching_on(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    assert fake.engines[0].engine_args == {"enable_prefix_caching": True}
    assert asyncio.run(policy.context_window()) == 4096  # the stand-in's max_model_len
    assert (policy.batching, policy.supports_n, policy.supports_logprobs) == (True, True, True)
    assert (policy.counts_tokens, policy.knows_context_window) == (True, True)


@pytest.mark.parametrize(
    "options",
    [{"enable_prefix_caching": False}, {"engine_args": {"enable_prefix_caching": False}}],
)
def test_prefix_caching_can_be_switched_off_explicitly(fake: Any, options: dict[str, Any]) -> None:
    VLLMPolicy.from_spec("m", **options)
    assert fake.engines[0].engine_args["enable_prefix_caching"] is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_paralel_size": 2}, "tensor_paralel_size"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": "two"}, "tensor_parallel_size"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"engine_args": "max_num_seqs=3"}, "engine_args must be a mapping"),
        ({"engine_args": {"model": "other"}}, "in the spec"),
        ({"max_model_len": 4096, "engine_args": {"max_model_len": 2048}}, "both as an option and in engine_args"),
        ({"engine_args": {"max_num_seqz": 3}}, "max_num_seqz"),  # vLLM's own TypeError, as a ConfigError
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"dtype": 16}, "the vllm policy backend: dtype must be a non-empty string, got 16"),
        ({"trust_remote_code": "yes"}, "trust_remote_code must be true or false"),
    ],
)
def test_bad_options_are_config_errors(fake: Any, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VLLMPolicy.from_spec("m", **options)


def test_a_model_is_required(fake: Any) -> None:
    with pytest.raises(ConfigError, match="vllm:MODEL_OR_PATH"):
        VLLMPolicy.from_spec("")
    assert fake.engines == []


def test_a_failing_load_is_a_backend_error_naming_the_model(fake: Any) -> None:
    fake.fail_next("__init__", RuntimeError("CUDA out of memory"))
    with pytest.raises(BackendError, match=r"could not load 'big/model'.*CUDA out of memory"):
        VLLMPolicy.from_spec("big/model")


def test_the_registry_builds_it_from_a_spec(fake: Any) -> None:
    policy = policy_from_spec("vllm:org/m", tensor_parallel_size=4)
    assert isinstance(policy, VLLMPolicy)
    assert fake.engines[0].engine_args["tensor_parallel_size"] == 4


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    vllm_stub.hide(monkeypatch)
    with pytest.raises(MissingDependencyError) as info:
        VLLMPolicy.from_spec("org/m")
    assert "'vllm'" in str(info.value) and "pip install 'tpo[vllm]'" in str(info.value)
    assert info.value.extra == "vllm"


@pytest.mark.parametrize(
    "error",
    [
        ModuleNotFoundError("No module named 'torch'", name="torch"),
        ImportError("libcudart.so.12: cannot open shared object"),
    ],
)
def test_a_broken_vllm_install_is_a_backend_error(monkeypatch: pytest.MonkeyPatch, error: ImportError) -> None:
    vllm_stub.break_import(monkeypatch, error)
    with pytest.raises(BackendError, match="vLLM is installed but could not be imported") as info:
        VLLMPolicy.from_spec("org/m")
    assert info.value.backend == "vllm"
    assert info.value.__cause__ is error


def test_forbidden_real_requests_stop_the_load_before_vllm_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    vllm_stub.allow_real_requests(monkeypatch, False)
    fake = vllm_stub.install(monkeypatch)  # the stand-in is a double: installing it allows loads again
    VLLMPolicy.from_spec("org/m")
    assert len(fake.engines) == 1
    vllm_stub.allow_real_requests(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"vllm:org/other: real model requests are forbidden"):
        VLLMPolicy.from_spec("org/other")
    assert len(fake.engines) == 1


def test_importing_the_backend_does_not_import_vllm() -> None:
    # A finder that fails any import of vllm: loading the module (as `tpo backends` does) must not trip it.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm imported at module level')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tpo, tpo.backends.vllm_local\n"
        "from tpo.registry import list_plugins\n"
        "[info] = [p for p in list_plugins('tpo.backends') if p.name == 'vllm']\n"
        "assert info.error is None, info.error\n"
        "assert info.capabilities['batching'] is True\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- generation


def test_a_batch_is_one_chat_call_with_per_request_sampling(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    requests = [
        _request("first question here", n=3, temperature=0.7, top_p=0.95, max_tokens=64, seed=1),
        _request("second", n=1, system="Be terse.", temperature=0.0, top_p=1.0, max_tokens=8, seed=2, stop=("\n\n",)),
        _request("third one", n=2, temperature=1.2, top_p=0.5, max_tokens=32, seed=None, logprobs=3),
    ]
    gens = asyncio.run(policy.generate(requests))

    [call] = fake.calls_to("chat")
    assert fake.calls == [call]
    (conversations,) = call.args
    assert conversations == [
        [{"role": "user", "content": "first question here"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "second"}],
        [{"role": "user", "content": "third one"}],
    ]
    params = call.kwargs["sampling_params"]
    assert isinstance(params, list) and all(isinstance(p, vllm_stub.SamplingParams) for p in params)
    assert params == [
        vllm_stub.SamplingParams(n=3, temperature=0.7, top_p=0.95, max_tokens=64, seed=1),
        vllm_stub.SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=8, seed=2, stop=["\n\n"]),
        vllm_stub.SamplingParams(n=2, temperature=1.2, top_p=0.5, max_tokens=32, seed=None, logprobs=3),
    ]
    assert call.kwargs["use_tqdm"] is False
    assert call.kwargs["add_generation_prompt"] is True and call.kwargs["chat_template"] is None

    assert [len(g.texts) for g in gens] == [3, 1, 2]
    assert gens[0].texts == tuple(f"sample {i} seed 1 says first question here" for i in range(3))
    assert gens[1].texts == ("sample 0 seed 2 says second",)
    assert all(g.finish_reasons == ("stop",) * len(g.texts) for g in gens)
    tokenizer = fake.engines[0].get_tokenizer()
    for request, gen in zip(requests, gens, strict=True):
        assert gen.prompt_tokens == policy.count_tokens(request.messages)
        assert gen.completion_tokens == sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in gen.texts)
    assert gens[0].logprobs is None and gens[2].logprobs is not None


def test_finish_reasons_and_max_tokens_come_back_from_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = vllm_stub.install(monkeypatch, reply=lambda conv, p, i: "one two three four five six seven")
    policy = VLLMPolicy.from_spec("m")
    [short, long] = asyncio.run(policy.generate([_request("q", max_tokens=3), _request("q", max_tokens=50)]))
    assert short.texts == ("one two three",) and short.finish_reasons == ("length",)
    assert short.completion_tokens == 3
    assert long.texts == ("one two three four five six seven",) and long.finish_reasons == ("stop",)
    assert len(fake.calls_to("chat")) == 1


def test_logprobs_are_mapped_with_decoded_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    vllm_stub.install(monkeypatch, reply=lambda conv, p, i: "seven out of ten")
    policy = VLLMPolicy.from_spec("m")
    [gen] = asyncio.run(policy.generate([_request("rate it", n=2, logprobs=2)]))
    assert gen.logprobs is not None and len(gen.logprobs) == 2
    tokens = gen.logprobs[0]
    assert tokens is not None
    assert [t.token for t in tokens] == ["seven", "out", "of", "ten"]
    assert all(t.logprob == -0.25 for t in tokens)
    # The top alternatives in rank order: the sampled token (rank 1), then rank 2.
    assert tokens[0].top == (("seven", -0.25), ("alt2", -2.25))
    assert tokens[3].top[1][0] == "alt2" and tokens[3].top[1][1] == pytest.approx(-2.55)


def test_logprobs_fall_back_to_the_tokenizer_when_vllm_did_not_detokenize(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    tokenizer = fake.engines[0].get_tokenizer()
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    completion = vllm_stub.CompletionOutput(
        0,
        "hello world",
        ids,
        None,
        [
            {ids[0]: vllm_stub.Logprob(-0.1, 1, None)},
            {ids[1]: vllm_stub.Logprob(-0.2, 4, None), 99: vllm_stub.Logprob(-0.05, 1, None)},
        ],
        "stop",
    )
    tokens = policy._token_logprobs(completion, 1)
    assert tokens is not None
    assert [(t.token, t.logprob) for t in tokens] == [("hello", -0.1), ("world", -0.2)]
    assert tokens[1].top == (("<99>", -0.05),)  # only the top-1 alternative, not the sampled rank-4 token


def test_count_tokens_renders_the_chat_template(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    messages = (Message("system", "be kind"), Message("user", "how are you today"))
    # The stand-in's template: a role marker and an end marker per message, the words, and the generation prompt.
    assert policy.count_tokens(messages) == (2 + 2) + (2 + 4) + 1


def test_an_engine_without_a_tokenizer_counts_nothing_but_still_generates(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    llm = fake.engines[0]

    def no_tokenizer() -> Any:
        raise ValueError("the tokenizer was not initialised (skip_tokenizer_init=True)")

    llm.get_tokenizer = no_tokenizer
    assert policy.count_tokens((Message("user", "hi"),)) is None
    [gen] = asyncio.run(policy.generate([_request("hi")]))
    assert gen.texts == ("sample 0 seed None says hi",)


def test_a_vllm_failure_is_a_backend_error_and_the_backend_recovers(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    fake.fail_next("chat", RuntimeError("engine dead"))
    with pytest.raises(BackendError, match="engine dead") as info:
        asyncio.run(policy.generate([_request("a"), _request("b")]))
    assert info.value.backend == "vllm:m"
    [gen] = asyncio.run(policy.generate([_request("a")]))
    assert gen.texts


def test_calls_never_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    active = 0
    peak = 0
    guard = threading.Lock()

    def slow(conv: Any, params: Any, i: int) -> str:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with guard:
            active -= 1
        return "ok"

    fake = vllm_stub.install(monkeypatch, reply=slow)
    policy = VLLMPolicy.from_spec("m")

    async def both() -> None:
        await asyncio.gather(policy.generate([_request("a")]), policy.generate([_request("b")]))

    asyncio.run(both())
    assert len(fake.calls_to("chat")) == 2
    assert peak == 1


def test_generate_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []

    def reply(conv: Any, params: Any, i: int) -> str:
        threads.append(threading.get_ident())
        return "ok"

    vllm_stub.install(monkeypatch, reply=reply)
    policy = VLLMPolicy.from_spec("m")
    asyncio.run(policy.generate([_request("a")]))
    assert threads and threads[0] != threading.get_ident()


def test_closed_backend_refuses_work(fake: Any) -> None:
    policy = VLLMPolicy.from_spec("m")
    asyncio.run(policy.aclose())
    with pytest.raises(BackendError, match="closed"):
        asyncio.run(policy.generate([_request("a")]))
    assert asyncio.run(policy.generate([])) == []


# ---------------------------------------------------------------------------- through the engine


@pytest.mark.parametrize("depth", [1, 2])
def test_optimize_many_sends_each_step_of_every_prompt_in_one_call(fake: Any, depth: int) -> None:
    policy = VLLMPolicy.from_spec("m", max_model_len=8192)
    reward = FunctionReward(lambda messages, answer: float(len(answer)))
    prompts: list[Any] = [
        "Explain tides.",
        "Name three primes.",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    ]
    results = list(tpo.optimize_many(prompts, policy=policy, reward=reward, width=3, depth=depth, max_tokens=64))

    assert sorted(r.prompt_id for r in results) == ["0", "1", "2"]
    assert all(r.status == "complete" for r in results)
    chats = fake.calls_to("chat")
    assert len(chats) == 1 + 3 * depth
    # Every call carries one conversation per prompt, with that step's sampling parameters.
    for call in chats:
        assert len(call.args[0]) == 3
    sample_params = chats[0].kwargs["sampling_params"]
    assert [p.n for p in sample_params] == [3, 3, 3]
    assert len({p.seed for p in sample_params}) == 3  # each prompt has its own seed
    loss_params = chats[1].kwargs["sampling_params"]
    assert [p.n for p in loss_params] == [1, 1, 1]
    update_params = chats[3].kwargs["sampling_params"]
    assert [p.n for p in update_params] == [3, 3, 3]
    system_first = [conv for conv in chats[0].args[0] if conv[0]["role"] == "system"]
    assert system_first == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    ]
    assert all(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 for r in results)


def test_the_stand_in_answers_pooling_calls_in_vllm_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in is shared with the vLLM reward model's tests; keep its pooling side honest too.
    fake = vllm_stub.install(monkeypatch, pool=lambda prompt: [0.25, 0.75])
    import vllm  # the stand-in

    llm = vllm.LLM(model="rm", runner="pooling")
    [rewarded] = llm.reward(["a conversation"], use_tqdm=False)
    assert rewarded.outputs.data.tolist() == [0.25, 0.75]
    [classified] = llm.classify([{"prompt_token_ids": [1, 2, 3]}], use_tqdm=False)
    assert classified.outputs.probs == [0.25, 0.75]
    [embedded] = llm.embed("text", use_tqdm=False)
    assert embedded.outputs.embedding == [0.25, 0.75]
    [scored] = llm.score("query", ["doc"], use_tqdm=False)
    assert scored.outputs.score == 0.25
    assert [c.method for c in fake.calls] == ["reward", "classify", "embed", "score"]
    assert fake.engines[0].engine_args == {"runner": "pooling"}
    with pytest.raises(TypeError):
        vllm.LLM(model="rm", not_an_engine_arg=1)
    from vllm.outputs import PoolingRequestOutput

    assert isinstance(rewarded, PoolingRequestOutput)
