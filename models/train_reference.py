"""Train the reference checkpoints with ``lrnn train`` and write their model cards.

    .venv/bin/python models/train_reference.py [NAME ...]      (default: all)
    .venv/bin/python models/train_reference.py --cards-only NAME ...

``--cards-only`` rewrites the cards of checkpoints already trained by their command (the
long sMNIST runs, started by hand in the background). Each card records the exact command,
task, hyper-parameters, seed, test accuracy (for the per-step language models: test perplexity,
bits per character and the unigram baseline), training time and which certificates hold for the
scheme the model runs.
"""
from __future__ import annotations

import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from lrnn_analysis.builtin_tasks import load_task
from lrnn_analysis.checkpoints import load_checkpoint
from lrnn_analysis.next_step_tasks import unigram_cross_entropy
from lrnn_analysis.objective import Objective, Totals
from lrnn_analysis.pipelines.stability import certify_model
from lrnn_analysis.stability.evidence import check_stored, stored_then_searched

HERE = Path(__file__).parent
DIGITS = "--task digits --hidden 64 --seed 0"
# sMNIST: the paper's schedule shape (Adam, decay x0.1 late), 100 epochs, one recipe for all three.
SMNIST = "--task smnist --hidden 64 --seed 0 --epochs 100 --lr 0.003 --grad-clip 1 --decay-epochs 80"
# Character-level language models: a prediction at every step, one schedule for all three; the
# antisymmetric RNN needs the damping gamma_W (it has no A to forget with).
CHARS = "--task chars --readout all --hidden 128 --seed 0 --epochs 60 --lr 0.01 --grad-clip 1"
# Next-step regression on Lorenz-63 (a target at every step, MSE), one schedule for both.
LORENZ = "--task lorenz --readout all --hidden 64 --seed 0 --epochs 200 --lr 0.01 --grad-clip 1 --eps 0.5"
# Radii at which the cards of models built to a Lipschitz bound state certified accuracy.
RADII = (0.1, 0.25, 0.5, 1.0)
MODELS = {
    "digits-lipschitz-euler": f"{DIGITS} --arch lipschitz --discretization euler",
    "digits-lipschitz-rk2": f"{DIGITS} --arch lipschitz --discretization rk2",
    "digits-lipschitz-certified": f"{DIGITS} --arch lipschitz --discretization euler --beta-a 1 --gamma-a 0.5 --gamma-w 0 "
                                  "--constrain euler-norm --margin 0.001",
    "digits-antisymmetric": f"{DIGITS} --arch antisymmetric",
    "digits-node": f"{DIGITS} --arch node",
    "digits-residual": f"{DIGITS} --arch residual",
    "digits-vanilla": f"{DIGITS} --arch vanilla --lr 0.003 --init-std 8 --grad-clip 1",
    "digits-cayley": f"{DIGITS} --arch cayley --lr 0.01",
    "digits-contracting": f"{DIGITS} --arch contracting --cond-penalty 0.03",
    "digits-ren": f"{DIGITS} --arch ren",
    "digits-lipschitz-ren": f"{DIGITS} --arch lipschitz-ren --lipschitz 8 --margin-radius 0.35 --epochs 200",
    "rowmnist-lipschitz-ren": "--task smnist --pixels-per-step 28 --hidden 64 --seed 0 --arch lipschitz-ren --lipschitz 8 "
                              "--margin-radius 0.3 --epochs 60 --decay-epochs 48",
    "smnist-lipschitz": f"{SMNIST} --arch lipschitz",
    "smnist-antisymmetric": f"{SMNIST} --arch antisymmetric",
    "smnist-contracting": f"{SMNIST} --arch contracting",
    "chars-lipschitz": f"{CHARS} --arch lipschitz --eps 0.25",
    "chars-lstm": f"{CHARS} --arch lstm",
    "chars-antisymmetric": f"{CHARS} --arch antisymmetric --eps 0.5 --gamma-w 2",
    "lorenz-lipschitz": f"{LORENZ} --arch lipschitz",
    "lorenz-antisymmetric": f"{LORENZ} --arch antisymmetric --gamma-w 2",
}
# chars inputs are one-hot: what the LSTM layer reads is bounded by 1.
CHARS_INPUT_BOUND = 1.0


def per_step_scores(model: torch.nn.Module, record: dict) -> list[str]:
    """Card lines of a per-step model: for a language model its test perplexity, bits per character
    and token accuracy (computed here from the test split with ``Objective``) and the unigram
    baseline; for next-step regression its test MSE and the persistence baseline."""
    task = load_task(record["name"], seed=record["seed"], **record.get("options", {}))
    objective = Objective.of_targets(task.test.y)
    totals = Totals(0.0, 0, 0)
    model.eval()
    with torch.no_grad():
        for x, y in task.test.batches(256):
            totals = totals + objective.totals(model(x), y)
    scores = objective.metrics(totals)
    if not objective.classification:
        persistence = float(((task.test.x - task.test.y) ** 2).mean())
        return [
            f"- test MSE: **{scores['mse']:.5f}** per coordinate ({totals.count} test steps)",
            f"- persistence baseline (the next observation predicted to equal the current one): test MSE {persistence:.5f}",
            f"- data: {task.description}",
        ]
    baseline = unigram_cross_entropy(task.train.y, task.test.y, task.output_dim)
    return [
        f"- test perplexity: **{scores['perplexity']:.3f}**, **{scores['bits_per_token']:.4f} bits per character**, "
        f"next-character accuracy {scores['token_accuracy']:.4f} (per-token cross-entropy {scores['loss']:.4f} nats, "
        f"{totals.count} test characters)",
        f"- unigram baseline (training-split character frequencies, no context): test perplexity {math.exp(baseline):.3f}, "
        f"{baseline / math.log(2):.4f} bits per character",
        f"- data: {task.description}",
    ]


def card(name: str, command: str) -> str:
    model, meta = load_checkpoint(HERE / f"{name}.safetensors")
    config, metrics, task = model.config, meta["metrics"], meta["task"]
    system = model.lure_form()
    stored = check_stored(model, meta)
    results = stored_then_searched(stored, model, system, time_budget=60.0)
    per_step = config.readout == "all"
    params = sum(p.numel() for p in model.parameters())
    scheme = f"run with `{config.discretization}`, hidden {config.hidden}, eps {config.eps:g}"
    if config.arch == "lstm":
        scheme = f"one nn.LSTM layer, hidden {config.hidden}"
        hyper = "PyTorch's nn.LSTM initialisation (uniform in ±1/sqrt(hidden)), decoder Xavier-normal"
    elif config.arch in ("contracting", "ren", "lipschitz-ren"):
        hyper = f"rho {config.rho:g}, rank {config.rank or config.hidden}, init_std {config.init_std:g}" + (
            f", cond_penalty {config.cond_penalty:g}" if config.arch == "contracting" else "") + (
            f", built to Lipschitz bound G = {config.lipschitz:g}, margin radius {meta['training']['margin_radius']:g}"
            if config.arch == "lipschitz-ren" else "")
    else:
        hyper = (f"beta_A {config.beta_a:g}, gamma_A {config.gamma_a:g}, beta_W {config.beta_w:g}, "
                 f"gamma_W {config.gamma_w:g}, init_std {config.init_std:g}")
    lines = [
        f"# {name}", "",
        f"- task: `{task['name']}` (split seed {task['seed']}, options {task.get('options') or {}})",
        f"- architecture: `{config.arch}` {scheme}, readout `{config.readout}`, {params} parameters",
        f"- hyper-parameters: {hyper}; training {meta['training']}",
    ]
    trained = (f"training time {metrics['train_seconds']:.0f} s on {meta['environment']['device']} "
               f"(torch {meta['environment']['torch']}, Python {meta['environment'].get('python', '?')})")
    if per_step:
        score = "val_perplexity" if meta["log"][-1].get("val_perplexity") is not None else "val_mse"
        best = min(meta["log"], key=lambda entry: entry[score])
        lines += per_step_scores(model, task) + [
            f"- validation {'perplexity' if score == 'val_perplexity' else 'MSE'}: {meta['log'][-1][score]:.5g} after the last epoch, lowest "
            f"{best[score]:.5g} after epoch {best['epoch']}",
            f"- {trained}"]
    else:
        lines.append(f"- test accuracy: **{metrics['test_accuracy']:.4f}** (test loss {metrics['test_loss']:.4f}); {trained}")
    if "constraint" in meta:
        c = meta["constraint"]
        lines.append(f"- trained with `--constrain {c['certificate']} --margin {c['margin']}`: certified by construction")
    if stored.verified:
        e = stored.evidence
        lines.append(f"- carries certificate evidence: {e.certificate} at rate {e.rate:.6g} per step (tier {e.tier}), "
                     f"verified from the stored evidence in float64 in {stored.seconds * 1e3:.0f} ms")
    lines += ["", "Certificates for the scheme it runs (`lrnn stability`, 60 s budget):", ""]
    if system is None and config.arch == "lstm":
        certified = certify_model(model, time_budget=60.0, input_bound=CHARS_INPUT_BOUND)
        lines += [f"`lrnn stability models/{name}.safetensors --input-bound {CHARS_INPUT_BOUND:g}` (one-hot inputs): "
                  f"{certified.verdict()}"]
    elif results:
        lines += ["| certificate | holds | margin | rate | tier |", "|---|---|---|---|---|"]
        lines += [f"| {r.name} | {'yes' if r.holds else 'no'} | {r.margin:.4g} | {'-' if r.rate is None else f'{r.rate:.6g}'} | "
                  f"{r.tier or '-'} |" for r in results]
        # The strongest reason first, as lrnn stability's verdict gives it: an LMI's before a norm test's.
        failing = [r.reason for r in sorted(results, key=lambda r: not r.name.endswith("-lmi")) if not r.holds]
        if failing:
            lines += ["", f"Why not: {failing[0]}"]
    else:
        lines.append("None apply: the recurrence has no Lur'e form.")
    if config.arch == "lipschitz-ren":
        lines += ["", *certified_accuracy_lines(name, task)]
    lines += ["", "Reproduce:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def certified_accuracy_lines(name: str, task_record: dict) -> list[str]:
    """The certified bound and the certified accuracy on the test split at RADII: a test prediction
    counts when it is correct and its margin over every other class j exceeds pair_bound[i, j] * radius."""
    import torch

    from lrnn_analysis import load_model, load_task
    from lrnn_analysis.pipelines.stability import certify_lipschitz
    from lrnn_analysis.stability import certified_radii

    subject = load_model(HERE / f"{name}.safetensors")
    task = load_task(task_record["name"], seed=task_record["seed"], **(task_record.get("options") or {}))
    found = certify_lipschitz(subject, task.seq_len)
    gain = found.certificate
    with torch.no_grad():
        logits = subject.module(task.test.x)
    correct = (logits.argmax(dim=1) == task.test.y).numpy()
    radii = certified_radii(logits, gain.pair_bounds)
    stored = "" if found.stored is None else f"; {found.stored.describe()}"
    lines = [f"Certified Lipschitz bound of the whole input sequence ({task.seq_len} steps, l2 over time and features) "
             f"-> logits: **{gain.lipschitz:.6g}** (tier {gain.tier}, verified in float64{stored}); largest pair bound "
             f"{gain.pair_bounds.max():.6g}.", "",
             f"Certified accuracy on the {len(correct)} test sequences (correct and margin over every class j > "
             "pair_bound[i, j] * radius; `lrnn_analysis.stability.certified_radii`):", "",
             "| radius (l2) | " + " | ".join(f"{r:g}" for r in RADII) + " |", "|---" * (len(RADII) + 1) + "|",
             "| certified accuracy | " + " | ".join(f"{(correct & (radii > r)).mean():.4f}" for r in RADII) + " |"]
    return lines


def main(arguments: list[str]) -> None:
    cards_only = "--cards-only" in arguments
    names = [a for a in arguments if a != "--cards-only"] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    for name in names:
        command = f"lrnn train {MODELS[name]} --out models/{name}.safetensors --quiet"
        if not cards_only:
            print(f"$ {command}", flush=True)
            subprocess.run([str(Path(sys.executable).parent / "lrnn"), *shlex.split(command)[1:], "--force"], check=True,
                           cwd=HERE.parent)
        (HERE / f"{name}.md").write_text(card(name, command))


if __name__ == "__main__":
    main(sys.argv[1:])
