"""Worker for tests/test_label_issues.py: RWSAMTrainer with ``report_label_issues`` under torchrun (gloo, CPU), with
the Trainer's own shuffled batches.

Usage: torchrun --nproc_per_node 2 tests/distributed/label_issues_worker.py '<json settings>'

Settings: "out" (where rank 0 writes what the test checks), "samples", "per_device", "epochs". Every rank records,
per micro-batch in order, the example indices it trained on, the inputs it trained on and the margins its step
computed; rank 0 writes every rank's records, the data, the report (`label_issues()`) and the output folder.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from utils import TinyMLP, leave_process_group, make_tensors, sgd_config, tensor_dataset  # noqa: E402

from hf_rwsam import RWSAMTrainer  # noqa: E402
from hf_rwsam.columns import INDEX_COLUMN  # noqa: E402


class RecordingTrainer(RWSAMTrainer):
    records: list = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        index, x = inputs[INDEX_COLUMN].tolist(), inputs["x"].tolist()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.records.append({"index": index, "x": x, "margins": self.sharpness_step.sample_scores.margins.tolist()})
        return loss


def main():
    settings = json.loads(sys.argv[1])
    x, y = make_tensors(settings["samples"], seed=1)
    noisy = [i % 4 == 0 for i in range(settings["samples"])]
    args = sgd_config(settings["out"] + ".run", sam_mode="rwsam", report_label_issues=True,
                      per_device_train_batch_size=settings["per_device"], num_train_epochs=settings["epochs"])
    torch.manual_seed(0)
    trainer = RecordingTrainer(model=TinyMLP(), args=args, train_dataset=tensor_dataset(x, y, is_noisy=noisy))
    trainer.train()
    records = [None] * args.world_size
    dist.all_gather_object(records, trainer.records)
    if args.process_index == 0:
        torch.save({"records": records, "x": x, "y": y, "noisy": noisy, "world_size": args.world_size,
                    "report": trainer.label_issues().to_dict(), "output_dir": args.output_dir,
                    "log_history": trainer.state.log_history}, settings["out"])
    leave_process_group()


if __name__ == "__main__":
    main()
