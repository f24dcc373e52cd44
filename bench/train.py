"""Time per training epoch of ``lrnn train`` on sMNIST: the recurrence engine against the recorded loop.

One epoch is what ``lrnn_analysis.training.train_model`` runs per epoch: forward, loss, backward and
Adam step over every batch of the training split, then the evaluation of the validation split. The
model is a Lipschitz RNN at the paper's sMNIST size (one pixel per step, T = 784, n = 128, batch
128 by default) on the first ``--samples`` training and ``--val`` validation sequences of the
vendored MNIST digits. Two contenders, the same initial weights and data:
  * engine: the model as ``lrnn train`` runs it now (``model.engine = "recurrence"``);
  * recorded: ``model.engine = "autograd"``, the step recorded op by op, which is how every model
    was trained before the engine existed.
They alternate round by round, each round training a fresh copy of the same initial model for one
epoch; the table gives median (min, max) and the speed-up as the median of per-round ratios.

    python bench/train.py [--samples 1280] [--val 256] [--hidden 128] [--batch 128] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import copy

import torch
from common import alternating_times, ratio_spread, spread

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.environment import environment
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.task import Task
from lrnn_analysis.training import TrainSettings, train_model


def smnist_subset(samples: int, val: int) -> Task:
    task = load_task("smnist", seed=0)
    if samples > len(task.train) or val > len(task.val):
        raise SystemExit(f"--samples and --val must be at most {len(task.train)} and {len(task.val)}")
    return Task.from_arrays(task.train.x[:samples], task.train.y[:samples], task.test.x[:1], task.test.y[:1],
                            task.val.x[:val], task.val.y[:val], name="smnist-subset", num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1280)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = smnist_subset(args.samples, args.val)
    config = ModelConfig("lipschitz", 1, args.hidden, 10, eps=0.03, beta_a=0.75, gamma_a=0.001, beta_w=0.75, gamma_w=0.001)
    initial = build_model(config, seed=0)
    settings = TrainSettings(epochs=1, batch_size=args.batch, lr=0.003, seed=0)
    losses: dict[str, float] = {}

    def epoch(engine: str):
        def run() -> None:
            model = copy.deepcopy(initial)
            model.engine = engine
            result = train_model(model, task, settings, torch.device("cpu"), progress=False)
            losses[engine] = result.log[0]["train_loss"]
        return run

    env = environment(torch.device("cpu"))
    steps = task.train.x.shape[1]
    print(f"sMNIST subset: {args.samples} training and {args.val} validation sequences, T={steps}, n={args.hidden}, "
          f"batch {args.batch}, {torch.get_num_threads()} thread(s), torch {env['torch']}")
    times = alternating_times({"engine": epoch("recurrence"), "recorded": epoch("autograd")}, args.repeats, warmup=False)
    print(f"  training loss of the epoch: engine {losses['recurrence']:.6f}, recorded {losses['autograd']:.6f}")
    for name, values in times.items():
        print(f"  {name:9s} {spread(values)} per epoch")
    print(f"  speed-up of the engine: {ratio_spread(times['recorded'], times['engine'])}")


if __name__ == "__main__":
    main()
