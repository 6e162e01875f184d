"""Run under `accelerate launch` with 2 CPU processes: stream an epoch on every rank, with a collective
per step (a rank with fewer batches would hang it), then resume mid-epoch; rank 0 writes a report."""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.runtime import release_process_group


def digest(batch: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in sorted(batch))).hexdigest()


def main() -> None:
    data, out, resume_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    # Without cpu=True, accelerate 1.15 reports one process although the gloo group has two.
    state = PartialState(cpu=not torch.cuda.is_available())
    config = LoaderConfig(batch_size=40, num_workers=2, shuffle_buffer=200, max_history=12, seed=11)
    stream = SequenceStream(data, "train", config, rank=state.process_index, world_size=state.num_processes)
    stream.set_position(epoch=2)
    ids, digests = [], []
    for batch in make_loader(stream):
        step = torch.ones(1)
        dist.all_reduce(step)  # every rank must reach every step
        keep = batch["valid"]
        ids += list(
            zip(
                batch["user"][keep].tolist(),
                batch["target"][keep].tolist(),
                batch["target_time"][keep].tolist(),
                strict=True,
            )
        )
        digests.append(digest(batch))
    stream.set_position(epoch=2, batches_consumed=resume_at)
    resumed = [digest(batch) for batch in make_loader(stream)]
    gathered = [None] * state.num_processes
    dist.all_gather_object(
        gathered,
        {
            "ids": ids,
            "batches": len(digests),
            "resume_ok": resumed == digests[resume_at:],
            "backend": dist.get_backend(),
        },
    )
    if state.is_main_process:
        out.write_text(json.dumps({"world_size": dist.get_world_size(), "ranks": gathered}))
    release_process_group(completed=True)  # left to exit, gloo can abort a rank that did its work


if __name__ == "__main__":
    main()
