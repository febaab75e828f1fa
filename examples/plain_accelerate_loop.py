#!/usr/bin/env python
"""SAM / ASAM / m-SAM / RW-SAM in a plain Accelerate loop, without the Trainer: the small CNN on scikit-learn's digits.

    python examples/plain_accelerate_loop.py --sam_mode rwsam --max_steps 300 --output_dir outputs/loop
    python examples/plain_accelerate_loop.py --sam_mode msam --msam_micro_batch_size 8 --noise_rate 0.4
    torchrun --standalone --nproc_per_node 2 examples/plain_accelerate_loop.py --sam_perturbation_scope global

Everything sharpness-aware is one object, `hf_rwsam.SharpnessAwareStep`: the loop hands it a batch and its loss
function, and afterwards ``.grad`` holds the descent gradient for the loop's own optimizer step. Every field of
`SharpnessSettings` is a flag (``--sam_*``, ``--msam_*``, ``--rwsam_*``). Offline: the digits come with scikit-learn.
The final clean-test accuracy is printed, and the model saved to ``--output_dir``.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from hf_rwsam import SharpnessAwareStep, SharpnessSettings
from hf_rwsam.data import add_label_noise, collate_images, load_image_dataset, prepare_dataset
from hf_rwsam.models import create_model
from hf_rwsam.sharpness import AccelerateHost


@dataclass
class LoopArguments:
    output_dir: str = field(default="outputs/plain_loop", metadata={"help": "Where the trained model is saved."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    learning_rate: float = field(default=0.05, metadata={"help": "SGD learning rate (momentum 0.9, cosine decay)."})
    noise_rate: float = field(default=0.0, metadata={"help": "Symmetric label noise on the training labels."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the data order and RW-SAM's probes."})
    logging_steps: int = field(default=50, metadata={"help": "Print the loss and the step's diagnostics this often."})
    use_cpu: bool | None = field(
        default=None, metadata={"help": "Train on the CPU (several processes: gloo); default: when CUDA is absent."}
    )


def loss_fn(model, batch, return_outputs=False):
    """The loss being optimised, with the Trainer's `compute_loss` signature: the step calls the model through it."""
    outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    return (outputs.loss, outputs) if return_outputs else outputs.loss


@torch.no_grad()
def accuracy(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    return correct / total


def main(argv: list[str]) -> float:
    settings, loop = HfArgumentParser((SharpnessSettings, LoopArguments)).parse_args_into_dataclasses(args=argv)
    accelerator = Accelerator(cpu=loop.use_cpu if loop.use_cpu is not None else not torch.cuda.is_available())
    set_seed(loop.seed)

    splits = load_image_dataset("digits")
    train = splits["train"]
    if loop.noise_rate:
        train = add_label_noise(train, "symmetric", loop.noise_rate, seed=loop.seed)
    train = prepare_dataset(train, "digits", train=True, image_size=16, num_channels=1)
    test = prepare_dataset(splits["test"], "digits", train=False, image_size=16, num_channels=1)
    # Full batches only: m-SAM splits each batch into groups of m
    train_loader = DataLoader(train, batch_size=loop.batch_size, shuffle=True, drop_last=True, collate_fn=collate_images)
    test_loader = DataLoader(test, batch_size=256, collate_fn=collate_images)

    model = create_model("small_cnn", num_labels=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=loop.learning_rate, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, loop.max_steps)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    sam = SharpnessAwareStep(settings, AccelerateHost(accelerator), seed=loop.seed)

    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))
    progress = tqdm(range(loop.max_steps), disable=not accelerator.is_local_main_process, desc=settings.sam_mode)
    for step in progress:
        model.train()
        loss = sam(model, next(batches), loss_fn, global_step=step)  # .grad now holds the descent gradient
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if (step + 1) % loop.logging_steps == 0:
            logs = {"loss": accelerator.reduce(loss.detach(), "mean").item()}
            logs.update({k: accelerator.reduce(v, "mean").item() for k, v in sam.pop_metrics().items()})
            progress.write(f"step {step + 1}: " + ", ".join(f"{k} = {v:.4g}" for k, v in logs.items()))

    test_accuracy = accuracy(model, test_loader, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(loop.output_dir)
    accelerator.print(f"final clean-test accuracy: {test_accuracy:.4f} (sam_mode={settings.sam_mode}, "
                      f"{loop.max_steps} steps, {accelerator.num_processes} process(es); model in {loop.output_dir})")
    accelerator.end_training()
    return test_accuracy


if __name__ == "__main__":
    main(sys.argv[1:])
