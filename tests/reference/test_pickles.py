"""Whole-module pickles read without running their code, including files saved from a GPU by old
torch; hostile pickles refused: nothing in a file may change the process or write a file, and no
pickle may make the plain reader recurse or expand without bound."""
import copyreg
import io
import os
import pickle
import warnings

import pytest
import torch
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint
from lrnn_analysis.reference.models import MODEL_HPARAMS
from lrnn_analysis.reference.pickles import _latin1_bytes, load_plain_pickle, load_torch_file
from reference_files import CASES, HP, D, K, N, T, forget_reference_code, reference_forward, reference_name


class _OldTorchBackend:
    """Pickles like nn.Module's ``_backend`` attribute of PyTorch <= 1.3."""

    def __reduce__(self):
        import torch.nn.backends.thnn

        return (torch.nn.backends.thnn._get_thnn_function_backend, ())


# A module persistent id of a stand-in, pushed and popped: it makes torch's weights-only reader give
# up on the file, so the rest of the main pickle is read by the restricted legacy reader.
MODULE_PID = b"(X\x06\x00\x00\x00modulecmodels\nRnnModels\nNNtQ0"


def _legacy_file(main: bytes) -> io.BytesIO:
    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {}):
        pickle.dump(header, out, protocol=2)
    out.write(main)
    pickle.dump([], out, protocol=2)
    out.seek(0)
    return out


@pytest.mark.parametrize("class_name,legacy", [("RnnModels", False), ("RnnModels", True), ("rnn_models", False),
                                               ("relaxRNN", True)])
def test_whole_module_pickles_load_without_running_their_code(tmp_path, reference_code, class_name, legacy):
    cls = getattr(reference_code, class_name)
    torch.manual_seed(0)
    x = torch.randn(3, T, D)
    saved = {}
    for model_name, solver in CASES:
        module = cls(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"], alpha=HP["alpha"],
                     model=model_name, solver=solver)
        path = tmp_path / f"{reference_name(model_name, solver=solver)}.pkl"
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
        state = {k: v.detach().double() for k, v in module.state_dict().items()}
        saved[path] = (model_name, solver, reference_forward(model_name, state, x.double(), solver=solver))
    forget_reference_code(reference_code, tmp_path / "reference_code")
    for path, (model_name, _solver, expected) in saved.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model, metadata = load_checkpoint(path)
        with torch.no_grad():
            assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
        info = metadata["reference"]
        assert info["model"] == model_name and info["class"] == f"models.{class_name}"
        assert info["file"] == f"whole-module pickle (models.{class_name})"
        assert all(v["source"] == "pickle attribute" for v in info["hparams"].values())
        assert sorted(info["hparams"]) == sorted(MODEL_HPARAMS[model_name])
    assert reference_code.CALLS == []


def test_hostile_pickles_are_refused_without_running_code(tmp_path, reference_code):
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    class NamesAHelper:
        def __reduce__(self):
            return (reference_code._gaussian, (3,))

    class CallsAStandIn:
        def __reduce__(self):
            return (reference_code.RnnModels, ())

    module = reference_code.RnnModels(D, K, n_units=N)
    payloads = {"system": Exploit(), "reduce_payload": reference_code.make_payload(str(canary)), "helper": NamesAHelper(),
                "empty_call": CallsAStandIn(), "module_and_system": [module, Exploit()]}
    paths = {}
    for name, payload in payloads.items():
        for legacy in (False, True):
            path = tmp_path / f"LipschitzRNN_mnist_{name}_{legacy}.pkl"
            torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
            paths[path] = name
    cls = reference_code.RnnModels
    cls.__reduce_ex__ = lambda self, protocol: (copyreg.__newobj__, (type(self), str(canary)))
    for legacy in (False, True):  # NEWOBJ of a stand-in with arguments
        path = tmp_path / f"LipschitzRNN_mnist_newobj_{legacy}.pkl"
        torch.save(cls.__new__(cls), path, _use_new_zipfile_serialization=not legacy)
        paths[path] = "newobj_args"
    del cls.__reduce_ex__
    forget_reference_code(reference_code, tmp_path / "reference_code")
    expected = {"system": r"it would import (posix|os)\.system", "module_and_system": r"it would import (posix|os)\.system",
                "reduce_payload": r"stand-in for models\.RnnModels called or created with arguments \(a __reduce__ payload\)",
                "empty_call": r"stand-in for models\.RnnModels called like a function \(a __reduce__ payload\)",
                "helper": r"models\._gaussian", "newobj_args": r"stand-in for models\.RnnModels called or created with arguments"}
    for path, name in paths.items():
        with pytest.raises(CheckpointError, match=rf"refused to unpickle \(.*{expected[name]}") as caught:
            load_checkpoint(path)
        assert "weights_only=False" not in str(caught.value)
    assert not canary.exists() and reference_code.CALLS == []


@pytest.mark.parametrize("legacy", [False, True])
def test_pickles_saved_from_a_gpu_by_old_torch_load_on_the_cpu(tmp_path, reference_code, monkeypatch, legacy):
    module = reference_code.RnnModels(D, K, n_units=N, eps=HP["eps"], beta=HP["beta"], gamma=HP["gamma"],
                                      alpha=HP["alpha"], model="LipschitzRNN_ODE", solver="midpoint")
    path = tmp_path / f"{reference_name('LipschitzRNN_ODE', solver='midpoint')}.pkl"
    for submodule in (module, module.E, module.func):
        submodule._backend = _OldTorchBackend()
    with monkeypatch.context() as patch:  # the reference trains on CUDA: its storages say cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    assert b"cuda:0" in raw and b"_get_thnn_function_backend" in raw
    state = {k: v.detach().double() for k, v in module.state_dict().items()}
    x = torch.randn(2, T, D)
    expected = reference_forward("LipschitzRNN_ODE", state, x.double(), solver="midpoint")
    forget_reference_code(reference_code, tmp_path / "reference_code")
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        assert float((model(x).double() - expected).abs().max() / expected.abs().max()) < 1e-5
    assert reference_code.CALLS == []


def test_a_stand_in_module_id_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    content = load_torch_file(_legacy_file(b"\x80\x02" + MODULE_PID[:-1] + b"."))
    assert content.__name__ == "RnnModels" and list(tmp_path.iterdir()) == []


def test_build_on_an_allowed_function_is_refused_and_writes_no_patch_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # BUILD {'dump_patches': True} on torch._utils._rebuild_tensor, then a module id naming it:
    # torch's legacy reader would write '_rebuild_tensor.patch' into the working directory.
    main = (b"\x80\x02" + MODULE_PID + b"ctorch._utils\n_rebuild_tensor\nq\x05}X\x0c\x00\x00\x00dump_patches\x88sb0"
            b"(X\x06\x00\x00\x00moduleh\x05X\x03\x00\x00\x00abcX\x03\x00\x00\x00xyztQ.")
    with pytest.raises(pickle.UnpicklingError, match="BUILD"):
        load_torch_file(_legacy_file(main))
    assert not hasattr(torch._utils._rebuild_tensor, "dump_patches")
    assert list(tmp_path.iterdir()) == []


def test_a_module_id_naming_anything_but_a_stand_in_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = (b"\x80\x02" + MODULE_PID + b"(X\x06\x00\x00\x00modulectorch._utils\n_rebuild_tensor\n"
            b"X\x01\x00\x00\x00aX\x01\x00\x00\x00btQ.")
    with pytest.raises(pickle.UnpicklingError, match="module persistent id"):
        load_torch_file(_legacy_file(main))
    assert list(tmp_path.iterdir()) == []


def test_plain_reader_refuses_build_on_its_own_functions():
    hostile = b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__(X\x05\x00\x00\x00utf-8ts\x86b."
    with pytest.raises(pickle.UnpicklingError, match="BUILD"):
        load_plain_pickle(hostile)
    assert _latin1_bytes.__defaults__ == ("latin1",)


def test_plain_reader_bounds_shared_references_and_nesting():
    laughs = b"\x80\x02]q\x00(K\x01K\x02e"  # memo 0 = [1, 2]; memo i = (memo i-1, memo i-1)
    for i in range(1, 60):
        laughs += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    with pytest.raises(pickle.UnpicklingError, match="shared references"):
        load_plain_pickle(laughs + b".")
    loop: list = []
    loop.append(loop)
    with pytest.raises(pickle.UnpicklingError, match="nested deeper"):
        load_plain_pickle(pickle.dumps(loop))
    with pytest.raises(pickle.UnpicklingError, match="nested deeper"):
        load_plain_pickle(b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b".")
    history = {"loss": [[0.5] * 10] * 3, "eigA": [0.1, 0.2, 0.3], "eigW": [0.0] * 3, "testacc": [90.0] * 3}
    assert load_plain_pickle(pickle.dumps(history)) == history
