"""LoRA item-encoder throughput and model FLOPs utilisation of a 0.5B-parameter decoder LLM.

A Qwen2-style model with Qwen2.5-0.5B's shapes, randomly initialised (no download), LoRA on
q_proj/v_proj, encodes batches of item-length token sequences forward and backward under bf16
autocast through accelerate, so the same script measures one GPU, DDP or DeepSpeed ZeRO-2:

    python benchmarks/llm_gpu_throughput.py                                   # one GPU
    accelerate launch --config_file launchers/zero2.yaml benchmarks/llm_gpu_throughput.py
    python benchmarks/llm_gpu_throughput.py --tiny --steps 2                  # CPU smoke run

FLOPs per token: 2N forward + 2N for the activation gradients (the frozen base computes no weight
gradients; LoRA's own are negligible), N = parameters outside the embedding table, plus attention
(4 * layers * seq * hidden per token, forward and backward twice). MFU divides achieved FLOP/s by
--peak-tflops (H100 SXM bf16 dense: 989). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModel, Qwen2Config

from lrd_dist.config import LLMConfig
from lrd_dist.encoders.lora import apply_lora

REPO = Path(__file__).resolve().parents[1]
QWEN_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
TINY = {**QWEN_05B, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1024, help="distinct items encoded per step")
    parser.add_argument("--seq", type=int, default=32, help="tokens per item text")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--tiny", action="store_true", help="a tiny config (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/llm_gpu_throughput.json")
    args = parser.parse_args()

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    shapes = TINY if args.tiny else QWEN_05B
    torch.manual_seed(0)
    model = AutoModel.from_config(Qwen2Config(**shapes))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, LLMConfig(lora_rank=16, lora_alpha=32))
    total = sum(p.numel() for p in model.parameters())
    embedding = shapes["vocab_size"] * shapes["hidden_size"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=args.items, gradient_accumulation_steps=1)
        ds.update(gradient_clipping=0.0, train_batch_size=args.items * accelerator.num_processes)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)  # ds_configs/ leave the optimizer to us
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    ids = torch.randint(0, shapes["vocab_size"], (args.items, args.seq), device=accelerator.device)
    mask = torch.ones_like(ids)
    times = []
    for step in range(args.steps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        with accelerator.autocast():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = hidden.float().mean(1).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens = args.items * args.seq * accelerator.num_processes
    dense = 4 * (total - embedding)
    attention = 2 * 4 * shapes["num_hidden_layers"] * args.seq * shapes["hidden_size"]
    flops = (dense + attention) * tokens / seconds
    result = {
        "distributed_type": str(accelerator.distributed_type),
        "processes": accelerator.num_processes,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "parameters": total,
        "trainable": sum(p.numel() for p in trainable),
        "checkpointing": args.checkpointing,
        "step_seconds": seconds,
        "items_per_s": args.items * accelerator.num_processes / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_device": flops / 1e12 / accelerator.num_processes,
        "mfu": flops / accelerator.num_processes / (args.peak_tflops * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    if accelerator.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for key, value in result.items():
            print(f"{key:20} {value}")


if __name__ == "__main__":
    main()
