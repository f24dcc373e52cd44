"""Parameter-noise sweep: batched draws (vmap over stacked parameters) vs the per-draw loop.

Both paths evaluate the same perturbed parameter sets on the same data in the same run,
alternating, and must agree; only the ratio of their times is meaningful on a noisy machine.

    python bench/robustness.py [--draws 20] [--threads N] [--quick]

Cases: a digits-size model (T = 64, n = 64, the 359 test digits) and an sMNIST-size model
(T = 784, n = 128, 256 real MNIST test digits; 64 with --quick).
"""
from __future__ import annotations

import argparse

import torch
from common import alternating_times, ratio_spread, spread

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.models import ModelConfig, build_model
from lrnn_analysis.robustness import Perturbation, evaluate_parameter_draws, perturb_parameters


def run_case(name: str, task_name: str, hidden: int, samples: int, draws: int, repeats: int) -> None:
    task = load_task(task_name, seed=0)
    model = build_model(ModelConfig("lipschitz", task.input_dim, hidden, task.output_dim, eps=task.default_eps), seed=0).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    sets = [perturb_parameters(params, Perturbation("gaussian-relative", 0.05, seed=s)) for s in range(draws)]
    x, y = task.test.x[:samples], task.test.y[:samples]

    def batched():
        return evaluate_parameter_draws(model, sets, x, y, batch_size=samples, batched=True)

    def looped():
        return evaluate_parameter_draws(model, sets, x, y, batch_size=samples, batched=False)

    times = alternating_times({"loop": looped, "batched": batched}, repeats)
    same = all(a.accuracy == b.accuracy and abs(a.loss - b.loss) <= 1e-5 * abs(b.loss) for a, b in zip(batched(), looped(), strict=True))
    print(f"{name}: T={task.seq_len} n={hidden} samples={len(x)} draws={draws}, results agree: {same}")
    print(f"  loop     {spread(times['loop'])}")
    print(f"  batched  {spread(times['batched'])}")
    print(f"  time ratio (batched / loop), per round: {ratio_spread(times['batched'], times['loop'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device} (these cases run on the CPU)")
    run_case("digits", "digits", 64, 359, args.draws, args.repeats)
    run_case("sMNIST-size", "smnist", 128, 64 if args.quick else 256, args.draws, 2 if args.quick else args.repeats)


if __name__ == "__main__":
    main()
