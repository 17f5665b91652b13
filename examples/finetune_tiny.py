"""Fine-tune a small Llama with fused LoRA on a synthetic task, from start to end.

    python examples/finetune_tiny.py                 # inject_lora on a plain transformers model
    python examples/finetune_tiny.py --peft          # the same through PEFT + patch_peft_model
    python examples/finetune_tiny.py --4bit          # QLoRA: the base loaded in 4 bits (NF4, bitsandbytes)

The task: continue a count (each token is the previous one plus one, modulo the vocabulary) from a
random start. The base model is a randomly initialised Llama (built from LlamaConfig: nothing is
downloaded) and stays frozen; only the LoRA adapters train. The script trains with a progress bar,
shows the loss falling, saves the adapter in PEFT's format, reloads it into a fresh copy of the base
model, and checks that the reloaded model gives the same outputs.

On the CPU the layers run fused_lora's reference backend, on one thread by default (--threads): the
operations of a model this small are short, so more threads gain little on idle cores and cost a lot on
busy ones (measured on a 2-core machine, 300 steps: one thread 14-22 s; two threads 13 s on idle cores,
but 43 s, and 2 min 10 s, while other jobs kept the cores busy). On a CUDA GPU, unchanged, the Triton
kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
import transformers

import fused_lora

VOCAB, SEQ = 48, 24
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def base_model(device: str, four_bit: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)  # the same "pretrained" weights every time it is built
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    return load_4bit(model, device) if four_bit else model


def load_4bit(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The same weights as transformers loads a QLoRA base: NF4, double quantisation (needs bitsandbytes)."""
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=compute)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=q, device_map=device)


def counting_batch(batch: int, device: str, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return ((start + torch.arange(SEQ)) % VOCAB).to(device)


def add_lora(model: torch.nn.Module, use_peft: bool, r: int, dropout: float) -> torch.nn.Module:
    if not use_peft:
        print(fused_lora.inject_lora(model, TARGETS, r=r, lora_alpha=2 * r, lora_dropout=dropout))
        return model
    import peft

    model = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS)
    )
    print(fused_lora.patch_peft_model(model))
    return model


def save(model, use_peft: bool, directory: Path) -> None:
    if use_peft:
        model.save_pretrained(directory, save_embedding_layers=False)
    else:
        fused_lora.save_adapter(model, directory)


def reload(use_peft: bool, directory: Path, device: str, four_bit: bool = False) -> torch.nn.Module:
    model = base_model(device, four_bit)
    if use_peft:
        import peft

        model = peft.PeftModel.from_pretrained(model, directory)
        fused_lora.patch_peft_model(model)
        return model
    fused_lora.load_adapter(model, directory)
    return model


def train(model, steps: int, lr: float, batch: int, device: str, progress: bool) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(1)
    losses = []
    bar = range(steps)
    try:
        from tqdm import tqdm

        bar = tqdm(bar, desc="training", disable=not progress, dynamic_ncols=True)
    except ImportError:
        pass
    model.train()
    for step in bar:
        ids = counting_batch(batch, device, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--peft", action="store_true", help="go through Hugging Face PEFT + patch_peft_model")
    qlora = "QLoRA: load the base model in 4 bits (NF4, double quantisation; needs bitsandbytes)"
    ap.add_argument("--4bit", dest="four_bit", action="store_true", help=qlora)
    ap.add_argument("--out", type=Path, default=None, help="where to save the adapter (default: a temp dir)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; ignored on a GPU)")
    ns = ap.parse_args(argv)
    if ns.threads < 1:
        ap.error(f"argument --threads: {ns.threads} must be >= 1")
    if ns.four_bit and importlib.util.find_spec("bitsandbytes") is None:
        ap.error("--4bit needs bitsandbytes: pip install 'fused_lora[qlora]'")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(ns.threads)
    try:
        return run(ns, device)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (the tests do)


def run(ns: argparse.Namespace, device: str) -> int:
    print(f"device {device}: LoRA layers run on the {fused_lora.backend.resolve_backend(torch.device(device))} backend")
    model = add_lora(base_model(device, ns.four_bit), ns.peft, ns.rank, ns.dropout)
    losses = train(model, ns.steps, ns.lr, ns.batch, device, not ns.no_progress)
    head, tail = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    print(
        f"loss: {head:.3f} over the first 10 steps -> {tail:.3f} over the last 10 (uniform guess: "
        f"{torch.log(torch.tensor(float(VOCAB))).item():.3f})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        directory = ns.out or Path(tmp) / "adapter"
        save(model, ns.peft, directory)
        files = sorted(p.name for p in Path(directory).iterdir())
        if ns.out:
            print(f"adapter saved to {directory}: {files}")
        else:  # a path that is gone once the script ends would only mislead
            print(f"adapter saved to a temporary folder, deleted at exit (--out DIR keeps it): {files}")
        again = reload(ns.peft, directory, device, ns.four_bit)
    model.eval()
    again.eval()
    ids = counting_batch(min(ns.batch, 4), device, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, again(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    predicted = a.argmax(-1)[:, :-1]
    accuracy = (predicted == ids[:, 1:]).float().mean().item()
    print(f"reloaded adapter: max |logits difference| = {diff:.2e}; next-token accuracy {accuracy:.0%}")
    if diff > 1e-4:
        print("FAILED: the reloaded model does not reproduce the trained one")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
