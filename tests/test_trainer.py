"""transformers.Trainer with a model given LoRA by inject_lora: AdapterCheckpointCallback writes PEFT
adapter files into every checkpoint; a run resumed from a checkpoint ends where the uninterrupted run
does; each checkpoint's adapter reloads into a fresh model (ours and PEFT's) and gives its outputs."""

from __future__ import annotations

import pytest
import torch

import fused_lora

from models import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

STEPS, EVERY = 4, 2
FILES = ["adapter_config.json", "adapter_model.safetensors"]


def injected():
    model = tiny_llama()
    fused_lora.inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    return model


def dataset():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (16, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer(model, out, callback=None):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=EVERY,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=STEPS,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=dataset(), callbacks=[callback] if callback else None
    )


def adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fused_lora.lora_state_dict(model).items()}


@pytest.fixture
def reference_backend():
    with fused_lora.use_backend("reference"):  # speed: the kernels are tested elsewhere
        yield


def test_checkpoints_hold_adapter_files_resume_and_reload(tmp_path, reference_backend):
    model = injected()
    callback = fused_lora.AdapterCheckpointCallback()
    trainer(model, tmp_path / "run", callback).train()
    final = adapters(model)
    ckpts = [tmp_path / "run" / f"checkpoint-{s}" for s in range(EVERY, STEPS + 1, EVERY)]
    assert callback.written == [*ckpts, tmp_path / "run"]
    for d in callback.written:
        assert all((d / f).is_file() for f in FILES), sorted(p.name for p in d.iterdir())

    # The adapter in checkpoint-2 is the model's state at step 2, as Trainer's own full save holds it.
    from safetensors.torch import load_file

    full = load_file(str(ckpts[0] / "model.safetensors"))
    at_2 = tiny_llama()
    fused_lora.load_adapter(at_2, ckpts[0])
    for k, v in adapters(at_2).items():
        assert torch.equal(v, full[k]), k

    # Resume from checkpoint-2 in a fresh process-like setting: it ends where the uninterrupted run ended.
    resumed = injected()
    trainer(resumed, tmp_path / "resume").train(resume_from_checkpoint=str(ckpts[0]))
    for k, v in adapters(resumed).items():
        torch.testing.assert_close(v, final[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")

    # The final adapter reloads into a fresh model, ours and PEFT's, with the trained outputs.
    ids = torch.arange(12).reshape(2, 6) % 64
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        ours = tiny_llama()
        fused_lora.load_adapter(ours, tmp_path / "run")
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "run")
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_callback_refuses_a_model_without_lora(tmp_path, reference_backend):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        trainer(tiny_llama(), tmp_path, fused_lora.AdapterCheckpointCallback()).train()
