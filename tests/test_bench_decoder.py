"""The whole-decoder-layer benchmark case (issue 16): on a tiny Llama layer, ours (fused and hybrid, through
the interpreter without a GPU) computes what PEFT's get_peft_model layer computes on the same weights —
output, dX and all fourteen adapter gradients, against PEFT's layer in fp64 by the parity rule — and
every provider runs with dropout; at full size (meta device) each provider keeps for backward exactly
what its layers must; the layer's roofline model adds up; the CLI's no-GPU run says so and labels the
model; the measured path's bookkeeping runs with the CUDA-only timers stubbed."""

from __future__ import annotations

import json

import pytest
import torch

from fused_lora.bench import cli, decoder, decoder_run, model, offline, summary, sweep
from fused_lora.kernels.utils import LAUNCHES

from helpers import assert_close_to_ref

pytest.importorskip("transformers")
pytest.importorskip("peft")

KEYS = [f"{t}.{k}" for t in decoder.TARGETS for k in "AB"]


def tiny(p: float, device: str, dtype=torch.float32) -> decoder.DecoderCase:
    return decoder.make_case(18, 9, 5, dtype, dtype, p, device, dims=decoder.TINY, shape="decoder-tiny")


def step(name: str, case, w):
    prov = decoder.build(name, case, w)
    y = prov.forward()
    prov.backward()
    return prov, y


@pytest.mark.parametrize("name", ["fused", "hybrid"])
def test_ours_and_peft_compute_the_same_layer(name, device):
    case = tiny(0.0, device)
    w = decoder.make_weights(case)
    ref, y64 = step("peft", *decoder_run.in_float64(case, w))
    same, y32 = step("peft", case, w)
    before = LAUNCHES.copy()
    ours, y = step(name, case, w)
    ran = LAUNCHES - before
    # seven projections, each one shrink and one grad pass, and the GEMMs (fused) or low-rank kernels (hybrid)
    assert ran["_shrink_kernel"] == 7 and ran["_lora_grad_kernel"] == 7, ran
    assert ran["_lora_gemm_kernel" if name == "fused" else "_low_rank_kernel"] == 14, ran
    assert_close_to_ref("y", y, y64, y32)
    assert_close_to_ref("dX", ours.x.grad, ref.x.grad, same.x.grad)
    got, want, peer = (decoder.adapter_grads(p) for p in (ours, ref, same))
    assert sorted(got) == sorted(want) == sorted(KEYS)
    for key in KEYS:
        assert_close_to_ref(key, got[key], want[key], peer[key])
    _, y0 = step("floor", case, w)
    assert (y64 - y0.double()).abs().max() > 1e-2, "the adapters must change the output (B is not zero)"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fused", "hybrid", "auto"])
def test_bf16_decoder_layer_matches_peft_on_gpu(name):
    """bf16 weights, fp32 adapters (the benchmark's dtypes; the interpreter's bf16 products are wrong, so on
    a GPU only), a layer past several tiles (hidden 512, 8/2 heads of 64, MLP 1400, 2 x 160 tokens): ours
    against PEFT's layer in fp64, within the rule's multiple of PEFT's own bf16 error."""
    dims = {"hidden": 512, "heads": 8, "kv_heads": 2, "head_dim": 64, "intermediate": 1400}
    case = decoder.make_case(320, 160, 16, torch.bfloat16, torch.float32, 0.0, "cuda", dims=dims, shape="gpu")
    w = decoder.make_weights(case)
    ref, y64 = step("peft", *decoder_run.in_float64(case, w))
    same, y16 = step("peft", case, w)
    ours, y = step(name, case, w)
    assert y.dtype == torch.bfloat16
    assert_close_to_ref("y", y, y64, y16)
    assert_close_to_ref("dX", ours.x.grad, ref.x.grad, same.x.grad)
    got, want, peer = (decoder.adapter_grads(p) for p in (ours, ref, same))
    for key in KEYS:
        assert got[key].dtype == torch.float32, key
        assert_close_to_ref(key, got[key], want[key], peer[key])


def test_dropout_reaches_every_projection(device):
    """With p = 0.1 ours and PEFT's run, their gradients are finite and non-zero, and the output moves away
    from p = 0's (every provider at both p: the CLI's smoke run, test_the_decoder_case_without_a_gpu)."""
    w = decoder.make_weights(tiny(0.0, device))
    _, y0 = step("fused", tiny(0.0, device), w)
    for name in ("fused", "peft"):
        prov, y = step(name, tiny(0.1, device), w)
        assert torch.isfinite(y).all() and torch.isfinite(prov.x.grad).all(), name
        grads = decoder.adapter_grads(prov)
        assert sorted(grads) == sorted(KEYS), name
        assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values()), name
        assert (y.detach() - y0.detach()).abs().max() > 1e-3, f"{name}: dropout changed nothing"


def test_saved_bytes_at_full_size_are_what_each_provider_must_keep():
    """Llama-3-8B's layer, M = 8192, bf16 with fp32 adapters, on the meta device (dropout and attention as on
    CUDA). Over the bare layer, ours keeps the three projection inputs that the frozen layer does not (the
    two normed hidden states, the MLP's product) and an fp32 xa [M, r] per projection (and a seed each with
    dropout); PEFT casts each projection's input to fp32 (seven copies: q, k and v each cast the same x)
    and keeps its bf16 xa... in fp32 too; with dropout, a bool mask per projection besides."""
    M, H, I, r = 8192, 4096, 14336, 16
    cases = [decoder.make_case(M, 2048, r, torch.bfloat16, torch.float32, p, "meta") for p in (0.0, 0.1)]
    rows = offline.memory_rows(cases, list(decoder.PROVIDERS), {}, progress=False, suite=decoder_run.SUITE)
    saved = {(row["provider"], row["dropout"]): round(row["saved_mb"] * 1e6) for row in rows}
    for p in (0.0, 0.1):
        floor = saved["floor", p]
        assert floor > 0 and saved["floor", p] == saved["floor", 0.0]
        ours = 2 * M * H * 2 + 2 * M * I + 7 * 4 * M * r + (7 * 8 if p else 0)
        for name in ("fused", "hybrid", "auto"):
            assert saved[name, p] - floor == ours, (name, p)
        peft = 6 * 4 * M * H + 4 * M * I + 7 * 4 * M * r + ((6 * M * H + M * I) if p else 0)
        assert saved["peft", p] - floor == peft, p


def test_the_layer_model_adds_up():
    d = model.DecoderDims(4096, 32, 8, 128, 14336, 4, 2048)
    M, r = d.M, 16
    gemm = 2 * M * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)
    attention = 2 * 4 * 32 * 2048**2 * 128  # causal: half of 4·B·h·S²·d
    assert model.decoder_flops("floor", "fwd", d, r) == gemm + attention
    floor = model.decoder_passes("floor", "fwd", d, r)
    assert sum(p.flops for p in floor if ": " in p.name) == gemm  # the projections' passes are named "q: ..."
    h100 = model.GPUS["h100"]
    t = {(n, ea): model.roofline_ms(model.decoder_passes(n, "fwdbwd", d, r, 2, ea, True), h100)
         for n in model.DECODER_PROVIDERS for ea in (2, 4)}  # fmt: skip
    assert t["floor", 2] < t["fused", 2] == t["auto", 2] < t["hybrid", 2] < t["peft", 2] < t["peft", 4]
    assert 1.0 < t["fused", 4] / t["floor", 4] < 1.15
    # PEFT with fp32 adapters: x cast to fp32 and the low-rank path in fp32 (per projection)
    K = 4096
    bf16, fp32 = (model.passes("peft", "fwd", M, K, K, r, 2, ea) for ea in (2, 4))
    assert {"x.to(adapter dtype)", "result.to(x dtype)"} <= {p.name for p in fp32} - {p.name for p in bf16}
    # two casts of 6 bytes per element (read 2, write 4 / read 4, write 2), the low-rank path's reads and
    # writes at 4 bytes instead of 2: x and t [M, K] twice each, A, B and xa once and twice
    extra = sum(p.bytes for p in fp32) - sum(p.bytes for p in bf16)
    assert extra == 6 * M * K + 6 * M * K + 2 * (M * K + r * K + M * r) + 2 * (M * r + r * K + M * K) + 8 * M * K


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU run (with a GPU, cli.main measures)")
def test_the_decoder_case_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "dec.jsonl"
    argv = ["--case", "decoder", "--dropout", "0,0.1", "--modes", "fwd,fwdbwd", "--out", str(out), "--no-plots",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "No CUDA GPU here: speed needs one." in flat and "NO speed claims" in flat
    assert "smoke run (interpreter, correctness only): 10 ok, 0 n/a" in text
    assert "headline case: decoder-8b, 4 x 2048 tokens (Llama decoder layer: hidden 4096, 32/8 heads of 128" in text
    assert "MODELLED forward+backward on an H100 SXM, ms (x floor): a roofline, not measured:" in text
    lines = text.splitlines()
    assert max(len(line) for line in lines if str(tmp_path) not in line) <= 110, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not any(r["speed_valid"] for r in rows)
    assert {r["provider"] for r in rows if r["mode"] == "saved"} == set(decoder.PROVIDERS)
    modelled = {(r["provider"], r["dropout"], r["mode"]) for r in rows if r.get("model_ms")}
    assert len(modelled) == 5 * 2 * 2
    tables = (tmp_path / "dec-tables.txt").read_text()
    assert "1. smoke run" in tables and "max |y - y64(peft)| / max |y64|" in tables
    assert "3. MODELLED time of the layer" in tables and "a limit, not a measurement" in tables


def test_the_measured_path_with_stub_timers(monkeypatch, device):
    """The GPU run's bookkeeping on a tiny layer: the providers are built and run for real, only the clock
    and the CUDA peak-memory counter are stubbed."""
    fake = {"fused": 1.0, "peft": 2.0, "floor": 0.8}
    timed = []

    def fake_time(fn, grad_to_none=None, rep=100):
        fn()
        timed.append(fn)
        return (1.0, 0.9, 1.1)

    monkeypatch.setattr(sweep, "time_ms", fake_time)
    monkeypatch.setattr(sweep, "peak_bytes", lambda fn, dev: 4096)
    env = {"gpu": "stub", "torch": "t", "triton": "t", "date": "d", "commit": "c"}
    sunk = []
    rows, sections = decoder_run.run_measured([tiny(0.1, device)], list(fake), ["fwd"], model.GPUS["h100"], env,
                                              rep=1, progress=False, sink=sunk.append)  # fmt: skip
    assert len(timed) == 3 and [len(b) for b in sunk] == [3] and sunk[0] == rows
    for r in rows:
        r["ms"] = fake[r["provider"]]
    sweep.add_ratios(rows)
    fused = next(r for r in rows if r["provider"] == "fused")
    assert fused["ratio_to_floor"] == pytest.approx(1.25) and fused["speedup_vs_peft"] == pytest.approx(2.0)
    assert fused["saved_mb"] > 0 and fused["peak_mb"] == 4096 / 1e6 and fused["model_ms"] > 0
    assert fused["tflops"] > 0 and fused["batch"] == 2 and fused["seq"] == 9
    lines = summary.measured(rows, list(fake), memory=True)
    assert lines[0].startswith("headline case: decoder-tiny, 2 x 9 tokens")
    assert "  measured peak MB of a training step / MB kept for backward:" in lines
    assert sections[0][0].startswith("== decoder-tiny: Llama decoder layer: hidden 48")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--case", "decoder", "--providers", "fused-tma"],
         "argument --providers: 'fused-tma' not a provider of the decoder case; choose from fused, hybrid, auto"),
        (["--providers", "auto"], "argument --providers: 'auto' not a provider of the linear case"),
        (["--case", "decoder", "--shapes", "attn-7b"], "argument --shapes: the decoder case has one shape"),
        (["--case", "decoder", "--tokens", "3000"],
         "argument --tokens: 3000 is not a whole number of sequences of --seq-len 2048"),
        (["--case", "layer"], "argument --case: invalid choice: 'layer'"),
    ],
)  # fmt: skip
def test_bad_decoder_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_decoder_defaults():
    from fused_lora.bench.options import parse_args

    ns = parse_args(["--case", "decoder"])
    assert (ns.providers, ns.ranks, ns.adapter_dtype, ns.tokens, ns.seq_len) == (
        list(decoder.PROVIDERS), [16], "fp32", [8192], 2048)  # fmt: skip
    case = cli.decoder_cases(parse_args(["--case", "decoder", "--tokens", "1024,8192"]), "meta")
    assert [(c.batch, c.seq) for c in case] == [(1, 1024), (1, 1024), (4, 2048), (4, 2048)]
    linear = parse_args([])
    assert linear.ranks == [1, 4, 8, 16, 32, 64, 128, 256] and linear.adapter_dtype is None
    assert linear.providers == list(model.PROVIDERS)


def test_attention_on_the_meta_device_keeps_what_flash_attention_keeps():
    """Without the routing, SDPA on the meta device takes the math path and keeps [B, h, S, S] scores; with
    it, what CUDA's flash attention keeps: q, k, v (grouped-query: k and v with their own 2 heads), the
    output, an fp32 logsumexp [B, h, S] and its RNG state (three 8-byte words). Real tensors are left alone."""
    from fused_lora.bench.measure import cuda_attention, nbytes, saved_for_backward

    B, h, h_kv, S, d = 2, 4, 2, 64, 16
    q = torch.empty(B, h, S, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(B, h_kv, S, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with cuda_attention():
        kept = saved_for_backward(sdpa, [])
    assert nbytes(kept) == 2 * B * S * d * (h + 2 * h_kv + h) + 4 * B * h * S + 3 * 8  # RNG seed [2], offset []
    assert nbytes(saved_for_backward(sdpa, [])) > 4 * B * h * S * S  # the math path's scores
    x = torch.randn(1, 2, 5, 4, requires_grad=True)
    with cuda_attention():
        y = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    torch.testing.assert_close(y, torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True))
    assert torch.nn.functional.scaled_dot_product_attention.__module__ != "fused_lora.bench.measure"


def test_the_report_gives_the_decoder_its_own_section():
    """docs/benchmarks.md from a results file holding both cases: the decoder rows get a table of their own
    (time, ratio to the bare layer, PEFT's over ours, peak and saved MB) and stay out of the linear case's
    targets (its "fused" is the per-shape choice; the decoder's forces the fused GEMM)."""
    from fused_lora.bench import report

    from test_bench import _measured_rows

    linear = _measured_rows(lambda M, p, mode: 1.00)
    fields = decoder.make_case(8192, 2048, 16, torch.bfloat16, torch.float32, 0.1, "meta").fields()
    ms = {"fused": 10.0, "hybrid": 10.4, "auto": 10.0, "peft": 20.0, "floor": 9.0}
    rows = [{**fields, "mode": mode, "provider": prov, "speed_valid": True, "ms": t * (0.5 if mode == "fwd" else 1),
             "peak_mb": 3000.0, "saved_mb": 1500.0, "gpu": "g", "torch": "t", "triton": "t", "date": "d", "commit": "c"}
            for prov, t in ms.items() for mode in ("fwd", "fwdbwd")]  # fmt: skip
    page = report.render(linear + rows)
    assert page == report.render(linear) + "\n".join(report.decoder_section(rows)) + "\n"
    assert "## A whole decoder layer: decoder-8b, 4 x 2048 tokens" in page and "Times: measured, ms." in page
    assert "| fused | 0.1 | 5.000 | 1.111 | 10.000 | 1.111 | 2.00 | 3000 | 1500 |" in page
    assert "| peft | 0.1 | 10.000 | 2.222 | 20.000 | 2.222 | 1.00 | 3000 | 1500 |" in page
