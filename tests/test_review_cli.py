"""The toolkit's own warnings reach the user as one 'lrnn CMD: warning: ...' line."""
import torch

from lrnn_analysis.cli import main


def test_a_reference_file_warning_is_one_line(tmp_path, capsys):
    path = tmp_path / "LipschitzRNN_mnist_eps_0.1_beta_0.5_gamma_0.1.pkl"  # no alpha in the name: a warning
    torch.save({"E.weight": torch.zeros(3, 1), "E.bias": torch.zeros(3), "D.weight": torch.zeros(10, 3),
                "D.bias": torch.zeros(10), "C": torch.zeros(3, 3), "B": torch.zeros(3, 3)}, path)
    assert main(["info", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lrnn info: warning:") and "alpha is recorded nowhere" in err
    assert len(err.splitlines()) == 1 and ".py:" not in err
