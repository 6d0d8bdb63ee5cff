"""transformers models on FlashFuseMoE: experts_implementation="flashfusemoe" and apply(model) against
the same tiny models (2 layers, built from their config classes, no downloads) under "eager".

conftest sets TRITON_INTERPRET=1, so every fused path here runs the real Triton kernels (float64 and
float32). transformers' routers compute their scores in float32 even in a float64 model, so with
``apply`` (our router, in float64) the float64 comparison is to float32 routing precision.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashfusemoe.integrations import transformers as ffm  # noqa: E402

VOCAB, SEQ, BATCH = 64, 6, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1, output_router_logits=True,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                     router_aux_loss_coef=0.1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, router_aux_loss_coef=0.1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=8, intermediate_size=24, moe_intermediate_size=16, num_experts=6,
                       num_experts_per_tok=3, norm_topk_prob=True, router_aux_loss_coef=0.1)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                   router_aux_loss_coef=0.1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                         routed_scaling_factor=2.5, first_k_dense_replace=0, norm_topk_prob=True,
                         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8)),
}


def tiny_model(family, dtype, experts_implementation="eager"):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    config._experts_implementation = experts_implementation
    torch.manual_seed(1234)
    model = getattr(transformers, model_cls)(config).to(dtype)
    for module in model.modules():  # a selection bias that matters (zeros at init)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(0.05 * torch.randn_like(module.e_score_correction_bias))
    return model


def router_logits(out) -> tuple:
    """The router logits the model returns (some families' outputs have none in some transformers
    versions, e.g. DeepSeek-V3 in 5.17)."""
    return tuple(getattr(out, "router_logits", None) or ())


def run(model, input_ids):
    """Logits, loss (LM + router aux loss + a term through every router's logits) and the loss's gradient
    for every parameter."""
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    loss = out.loss + sum((logits.float() ** 2).mean() for logits in router_logits(out))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    return out, loss.detach(), dict(zip(named, grads))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6)) if b.numel() else 0.0


def compare(family, dtype, switch, tol, device="cpu", batch=BATCH, attn_implementation=None):
    model = tiny_model(family, dtype).to(device)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(0, VOCAB, (batch, SEQ), device=device)
    eager = run(model, input_ids)
    switch(model)
    ours = run(model, input_ids)
    (out_e, loss_e, grads_e), (out_o, loss_o, grads_o) = eager, ours
    errors = {"logits": rel(out_o.logits, out_e.logits), "loss": rel(loss_o, loss_e)}
    assert len(router_logits(out_e)) == len(router_logits(out_o))
    for i, (le, lo) in enumerate(zip(router_logits(out_e), router_logits(out_o))):
        assert le.dtype == lo.dtype and le.shape == lo.shape
        errors[f"router_logits[{i}]"] = rel(lo, le)
    assert grads_e.keys() == grads_o.keys()
    errors.update({f"grad {n}": rel(grads_o[n], g) for n, g in grads_e.items()})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{family} {dtype}: relative errors above {tol}: {bad}"
    # Every expert weight had a gradient to compare (the test sees the experts' work).
    assert any("gate_up_proj" in n and grads_e[n].abs().max() > 0 for n in grads_e)
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_implementation_matches_eager(family, dtype, tol):
    compare(family, dtype, lambda m: m.set_experts_implementation(ffm.NAME), tol)


# float64: transformers' routers compute softmax/sigmoid in float32, so routing weights agree to that.
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 2e-6), (torch.float32, 2e-5)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_apply_matches_eager(family, dtype, tol):
    model = compare(family, dtype, ffm.apply, tol)
    ffm.restore(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


# "experts": only the experts module compiled, fullgraph (no graph break in our op): float64-exact.
# "layers" / "apply": whole decoder layers compiled, as ``python -m benchmarks.hf --compile`` runs them
# (transformers' output-capturing hooks break the graph around the router). Inductor then fuses the
# model's own float32 router softmax, which rounds differently from eager's, so routing weights agree
# to float32 precision, the bound ``test_apply_matches_eager`` uses for the same reason. Attention runs
# "eager": torch 2.11's Inductor fails float64 SDPA's CPU backward ("expected scalar type Double but
# found Float") with transformers' own experts too.
@pytest.mark.parametrize("path, tol", [("experts", 1e-10), ("layers", 2e-6), ("apply", 2e-6)])
def test_compiled_matches_eager(path, tol):
    """Our experts under ``torch.compile`` in a float64 Qwen3-MoE: eager's logits, loss and gradients."""
    torch._dynamo.reset()

    def switch_and_compile(model):
        if path == "apply":
            ffm.apply(model)
        else:
            model.set_experts_implementation(ffm.NAME)
        for layer in model.model.layers:
            if path == "experts":
                layer.mlp.experts.compile(fullgraph=True, dynamic=False)
            else:
                layer.compile(dynamic=False)

    compare("qwen3_moe", torch.float64, switch_and_compile, tol, attn_implementation="eager")


def test_apply_runs_the_fused_router(monkeypatch):
    """apply() routes with our kernel (DeepSeek-V3 in float32 included), the experts function does not."""
    calls = []
    original = ffm.moe_outputs
    monkeypatch.setattr(ffm, "moe_outputs", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    for family in ("deepseek_v3", "mixtral"):
        model = ffm.apply(tiny_model(family, torch.float32))
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))
    sigmoid, softmax = calls[0], calls[-1]
    assert (sigmoid.score_func, sigmoid.n_group, sigmoid.topk_group, sigmoid.routed_scaling_factor) == (
        "sigmoid", 2, 1, 2.5)
    assert (softmax.score_func, softmax.norm_topk_prob, softmax.top_k) == ("softmax", True, 2)
    assert len(calls) == 4


def test_parameters_shared_and_state_dict_round_trip(tmp_path):
    model = tiny_model("qwen2_moe", torch.float32)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.state_dict().items()}
    ffm.apply(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for n, (ptr, value) in before.items():
        assert after[n].data_ptr() == ptr and torch.equal(after[n], value), n
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=ffm.NAME)
    assert loaded.config._experts_implementation == ffm.NAME
    assert loaded.state_dict().keys() == before.keys()
    for n, (_, value) in before.items():
        assert torch.equal(loaded.state_dict()[n], value), n
    with torch.no_grad():
        loaded_logits = loaded(input_ids=input_ids).logits
        assert rel(loaded_logits, logits) < 2e-5
        applied_logits = ffm.apply(copy.deepcopy(loaded))(input_ids=input_ids).logits
        assert torch.equal(applied_logits, logits)


# (DeepSeek-V3 in float32: in float64 apply() keeps its float32 router)
@pytest.mark.parametrize("family, dtype", [("mixtral", torch.float64), ("deepseek_v3", torch.float32)])
def test_generate(family, dtype):
    model = tiny_model(family, dtype)
    # Generation doesn't need the router logits, and with them on, transformers 5.17's Mixtral fails
    # in eager mode too (its aux loss pairs the whole prompt's mask with one step's logits).
    model.config.output_router_logits = False
    prompt = torch.randint(0, VOCAB, (2, 4))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kw)
    model.set_experts_implementation(ffm.NAME)
    assert torch.equal(model.generate(prompt, **kw), expected)
    model.set_experts_implementation("eager")
    assert torch.equal(ffm.apply(model).generate(prompt, **kw), expected)


def test_registered_on_import():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    assert ALL_EXPERTS_FUNCTIONS[ffm.NAME] is ffm.experts_forward
    assert ExpertsInterface()[ffm.NAME] is ffm.experts_forward
    ffm.register()  # idempotent
    assert ffm.NAME in ALL_EXPERTS_FUNCTIONS


def test_unsupported_family_raises():
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                       layer_types=["full_attention"] * 2)
    model = transformers.GptOssForCausalLM(config)
    with pytest.raises(ffm.UnsupportedModelError, match=r"GptOssMLP"):
        ffm.apply(model)
    model.set_experts_implementation(ffm.NAME)
    with pytest.raises(ffm.UnsupportedModelError, match=r"GptOssExperts: expert biases \(has_bias=True\)"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))


@pytest.mark.parametrize(
    "flag, value, match",
    [("has_gate", False, "non-gated experts"), ("is_transposed", True, "transposed expert weights"),
     ("is_concatenated", False, "interleaved gate/up"),
     ("has_post_expert_norm", True, "a norm after each expert"),
     ("_is_expert_parallel", True, "expert parallelism")],
)
def test_unsupported_experts_flags_raise(flag, value, match):
    model = tiny_model("qwen3_moe", torch.float32, ffm.NAME)
    setattr(model.model.layers[1].mlp.experts, flag, value)
    with pytest.raises(ffm.UnsupportedModelError, match=match):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))
    with pytest.raises(ffm.UnsupportedModelError, match=match):
        ffm.apply(model)
    assert all("forward" not in m.__dict__ for m in model.modules())  # nothing half-applied


def test_unsupported_activation_raises():
    config_cls, model_cls, kwargs = FAMILIES["olmoe"]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs, hidden_act="gelu_pytorch_tanh")
    config._experts_implementation = ffm.NAME
    model = getattr(transformers, model_cls)(config)
    with pytest.raises(ffm.UnsupportedModelError, match="act_fn=.*GELUTanh"):
        model(input_ids=torch.randint(0, VOCAB, (1, 4)))


def test_gelu_experts_run_as_geglu():
    model = tiny_model("olmoe", torch.float64)
    for layer in model.model.layers:
        layer.mlp.experts.act_fn = transformers.activations.ACT2FN["gelu"]
    compare_model = copy.deepcopy(model)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    eager = run(compare_model, input_ids)
    model.set_experts_implementation(ffm.NAME)
    ours = run(model, input_ids)
    assert rel(ours[0].logits, eager[0].logits) < 1e-10
    assert all(rel(ours[2][n], g) < 1e-10 for n, g in eager[2].items())


def test_model_without_moe_raises():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="has no sparse-MoE block"):
        ffm.apply(transformers.LlamaForCausalLM(config))


def experts_bf16_errors(family, device, n=256):
    """One layer's experts module in bf16, eager and ours on the same routing: each one's relative error
    against float64 (same bf16 values upcast) in the output and the gradients of the states, the routing
    weights and both expert weights. End to end, bf16 rounding flips later layers' routing, so the
    comparison is made per layer."""
    model = tiny_model(family, torch.bfloat16).to(device)
    block = next(m for m in model.modules() if type(m).__name__ in ffm.SUPPORTED_BLOCKS)
    experts = block.experts
    x = torch.randn(n, experts.gate_up_proj.shape[2], dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        _, weights, ids = block.gate(x)
    grad_out = torch.randn_like(x)

    def grads(fn, dtype):
        leaves = [torch.nn.Parameter(t.detach().to(dtype))
                  for t in (x, weights, experts.gate_up_proj, experts.down_proj)]
        saved = experts.gate_up_proj, experts.down_proj
        experts.gate_up_proj, experts.down_proj = leaves[2:]
        try:
            out = fn(experts, leaves[0], ids, leaves[1])
        finally:
            experts.gate_up_proj, experts.down_proj = saved
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype))]

    eager_fn = lambda e, *a: type(e).forward.__wrapped__(e, *a)  # noqa: E731 (the undecorated eager loop)
    reference = grads(eager_fn, torch.float64)
    eager, ours = grads(eager_fn, torch.bfloat16), grads(ffm.experts_forward, torch.bfloat16)
    names = ("out", "grad x", "grad top_k_weights", "grad gate_up_proj", "grad down_proj")
    def norm_err(a, b):  # (a whole-tensor measure: a max over a few hundred bf16 roundings is noisy)
        return float((a.double() - b.double()).norm() / b.double().norm())

    return {n: (norm_err(o, r), norm_err(e, r)) for n, o, e, r in zip(names, ours, eager, reference)}


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_on_gpu(family):
    """CUDA kernels. bf16 experts (torch._grouped_mm) no less accurate than eager's against float64;
    end to end in float32 (ieee dots), both paths match eager to float32 rounding."""
    errors = experts_bf16_errors(family, "cuda")
    worse = {k: v for k, v in errors.items() if not v[0] <= 1.25 * v[1]}
    assert not worse, f"(ours, eager) relative errors vs float64 where ours is worse: {worse}"
    compare(family, torch.float32, lambda m: m.set_experts_implementation(ffm.NAME), 1e-4, "cuda", batch=16)
    compare(family, torch.float32, ffm.apply, 1e-4, "cuda", batch=16)
