"""Helpers of the command-line tests: parsing without running a command, the one line on stderr
that every bad input gives, and a file of the reference implementation."""
import argparse

import torch

from lrnn_analysis.cli import build_parser, main

CKPT = "m.safetensors"


def parse_args(*argv: str) -> argparse.Namespace:
    """The options ``lrnn argv`` parses to, without running the command."""
    return build_parser().parse_args(list(argv))


def error_line(capsys, command, path=None):
    """The one line "lrnn COMMAND: error: ..." on stderr, naming ``path`` if given."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lrnn {command}: error: ") and "Traceback" not in err
    if path is not None:
        assert str(path) in err
    return err


def fails(capsys, argv, *needles, path=None):
    """Run ``lrnn argv``: exit 2 and one error line holding every needle."""
    assert main(argv) == 2
    err = error_line(capsys, argv[0], path)
    for needle in needles:
        assert needle in err, err
    return err


def reference_file(tmp_path):
    """A LipschitzRNN state dict of the reference implementation, named the way its driver names it."""
    gen = torch.Generator().manual_seed(0)
    state = {"B": 0.3 * torch.randn(6, 6, generator=gen), "C": 0.3 * torch.randn(6, 6, generator=gen),
             "E.weight": torch.randn(6, 2, generator=gen), "E.bias": torch.zeros(6),
             "D.weight": torch.randn(4, 6, generator=gen), "D.bias": torch.zeros(4)}
    path = tmp_path / ("LipschitzRNN_mnist_T_392_units_6_beta_0.7_alpha_0.6_gamma_0.05_eps_0.3_solver_euler_"
                       "gclip_0_optimizer_Adam_seed_1.pkl")
    torch.save(state, path)
    return path
