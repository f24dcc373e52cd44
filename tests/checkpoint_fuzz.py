"""Seeded mutation fuzzing of the checkpoint loader: the child process that
tests/test_checkpoints.py runs as ``python checkpoint_fuzz.py DIRECTORY``.

Each mutated file (bit flips, truncations, inserted bytes, header edits of sizes, dtypes,
offsets, config values, metadata types and nesting) must either raise a one-line
CheckpointError naming the file, or load a model whose integrity hash is the original's.
The cases run in one child process under an address-space limit (an allocation the size
that a hostile header declares fails there instead of swapping), with a time limit per case;
the child reports its peak memory.
"""
import json
import random
import resource
import signal
import struct
import sys
import warnings
from pathlib import Path

SEED = 20261126
CASE_SECONDS = 20
ADDRESS_SPACE = 3 * 2**30  # the child's limit; importing torch takes about 0.7 GB of it


def _native_bytes(directory: Path) -> tuple[bytes, str]:
    from lrnn_analysis.checkpoints import load_checkpoint, save_checkpoint
    from lrnn_analysis.models import ModelConfig, build_model

    model = build_model(ModelConfig("lipschitz", 1, 3, 2, eps=0.2), seed=0)
    metadata = {"task": {"name": "digits", "seed": 0, "options": {}}, "metrics": {"test_accuracy": 0.5},
                "training": {"epochs": 2}, "log": [{"epoch": 1, "train_loss": 1.5, "val_accuracy": None}],
                "command": "lrnn train"}
    path = save_checkpoint(directory / "original.safetensors", model, metadata)
    return path.read_bytes(), load_checkpoint(path).sha256


def _torch_bytes(directory: Path, digest: str) -> bytes:
    import torch

    from lrnn_analysis.checkpoints import load_checkpoint

    model, metadata = load_checkpoint(directory / "original.safetensors")
    path = directory / "original.pt"
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "weights_sha256": digest,
                "task": metadata["task"]}, path)
    return path.read_bytes()


def _split(raw: bytes) -> tuple[dict, dict, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    record = json.loads(header["__metadata__"]["lrnn_analysis"])
    return header, record, raw[8 + size:]


def _join(header_text: str, data: bytes, length: int | None = None) -> bytes:
    encoded = header_text.encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _edited(raw: bytes, edit) -> bytes:
    """Apply ``edit(header, record)`` (which may return replacement header text) and reassemble."""
    header, record, data = _split(raw)
    text = edit(header, record)
    if text is None:
        header["__metadata__"]["lrnn_analysis"] = json.dumps(record)
        text = json.dumps(header)
    return _join(text, data)


def _header_edits(raw: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    header, _, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    cases = []

    def add(label, edit):
        cases.append((label, _edited(raw, edit)))

    def tensor_edit(field, value):
        def edit(h, r):
            h[rng.choice(names)][field] = value
        return edit

    for dtype in ("F8_E4M3", "F8_E5M2", "F4", "I32", "I64", "U8", "BOOL", "F16", "BF16", "F64", "", 5, None):
        add(f"dtype {dtype!r}", tensor_edit("dtype", dtype))
    for shape in ([20000, 20000], [10**9], [-1], [], [3, 3, 1], [1.5], [True], "3", [[3]], [2] * 40, [2**62, 2**62]):
        add(f"shape {str(shape)[:30]}", tensor_edit("shape", shape))
    for offsets in ([0, 0], [0, 10**12], [-4, 0], [8, 4], [0], [0, 1, 2], "0,4", [0.0, 36.0], [2**64, 2**64 + 36]):
        add(f"offsets {offsets!r}", tensor_edit("data_offsets", offsets))
    add("offsets overlap", lambda h, r: h[names[1]].update(data_offsets=h[names[0]]["data_offsets"]))
    add("extra tensor", lambda h, r: h.update(extra={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}))
    add("missing tensor", lambda h, r: h.pop(names[0]) and None)
    add("extra tensor key", lambda h, r: h[names[0]].update(note="x"))
    for key, value in (("hidden", 20000), ("hidden", 10**9), ("hidden", True), ("hidden", "3"), ("hidden", -1),
                       ("hidden", None), ("hidden", []), ("hidden", 4), ("input_dim", 0), ("output_dim", 70000),
                       ("eps", 0), ("eps", -1.0), ("eps", "0.1"), ("eps", 0.3), ("eps", [0.1]), ("arch", "gru"), ("readout", "every"), ("readout", 1),
                       ("arch", 3), ("arch", ["lipschitz"]), ("discretization", "rk4"), ("discretization", []),
                       ("ode_substeps", 10**6), ("beta_a", 1e308), ("gamma_w", -0.001), ("init_std", 0.0),
                       ("unknown_key", 1)):
        add(f"config {key}={str(value)[:20]}", lambda h, r, k=key, v=value: r["config"].update({k: v}))
    add("config missing", lambda h, r: r.pop("config") and None)
    add("config list", lambda h, r: r.update(config=[1, 2]))
    for section in ("metrics", "training", "environment", "task", "log", "command", "constraint", "weights_sha256"):
        for value in ([1, 2], "text", 3, None, {"a": {"b": []}}):
            add(f"metadata {section}={value!r}", lambda h, r, s=section, v=value: r.update({s: v}))
    for value in ({"name": 3}, {"seed": "0"}, {"seed": True}, {"options": []}):
        add(f"task {value!r}", lambda h, r, v=value: r["task"].update(v))
    add("log entry text", lambda h, r: r["log"].append({"epoch": "one"}))
    add("log entry list", lambda h, r: r["log"].append([1]))
    add("hash removed", lambda h, r: r.pop("weights_sha256") and None)
    add("hash other", lambda h, r: r.update(weights_sha256="0" * 64))
    add("format", lambda h, r: r.update(format="lrnn-analysis/2"))
    add("metadata not text", lambda h, r: h["__metadata__"].update(lrnn_analysis=5) or json.dumps(h))
    add("metadata missing", lambda h, r: h.pop("__metadata__") and json.dumps(h))
    add("metadata list", lambda h, r: h.update(__metadata__=[1]) or json.dumps(h))
    for depth in (40, 1000, 100000):
        add(f"metadata nested {depth}", lambda h, r, d=depth: _replace_record(h, r, "[" * d + "]" * d))
        add(f"header nested {depth}", lambda h, r, d=depth: json.dumps(h)[:-1] + ', "deep": ' + "[" * d + "]" * d + "}")
    for number in ("1" + "0" * 400, "1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 5000):
        add(f"config hidden raw {number[:10]}", lambda h, r, n=number: _replace_record(h, r, None, ("hidden", n)))
        add(f"config eps raw {number[:10]}", lambda h, r, n=number: _replace_record(h, r, None, ("eps", n)))
        add(f"header raw number {number[:10]}", lambda h, r, n=number: json.dumps(h)[:-1] + f', "n": {n}' + "}")
    add("duplicate header key", lambda h, r: json.dumps(h)[:-1] + f', "{names[0]}": ' + json.dumps(h[names[0]]) + "}")
    add("header not object", lambda h, r: "[1, 2]")
    add("header invalid", lambda h, r: "{" + "x" * 30)
    cases += [("header length huge", _join(json.dumps(header), data, 2**63)),
              ("header length 0", _join(json.dumps(header), data, 0)),
              ("header length past end", _join(json.dumps(header), data, len(json.dumps(header)) + len(data) + 1)),
              ("header not utf-8", _join(json.dumps(header), data)[:20] + b"\xff\xfe" + _join(json.dumps(header), data)[22:])]
    return cases


def _replace_record(header: dict, record: dict, deep: str | None, raw_number: tuple[str, str] | None = None) -> str:
    """Header text whose metadata record holds a raw JSON fragment (a deep list or an odd number)."""
    if deep is not None:
        text = json.dumps(record)[:-1] + ', "deep": ' + deep + "}"
    else:
        key, number = raw_number
        text = json.dumps({**record, "config": {**record["config"], key: "@@"}}).replace('"@@"', number)
    header["__metadata__"]["lrnn_analysis"] = text
    return json.dumps(header)


def _byte_mutations(raw: bytes, rng: random.Random, flips: int, cuts: int, inserts: int) -> list[tuple[str, bytes]]:
    cases = []
    for _ in range(flips):
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 3))):
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        cases.append((f"bit flip near byte {position}", bytes(data)))
    for _ in range(cuts):
        cut = rng.randrange(len(raw))
        cases.append((f"truncated at {cut}", raw[:cut]))
    for _ in range(inserts):
        position = rng.randrange(len(raw) + 1)
        inserted = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        cases.append((f"inserted at {position}", raw[:position] + inserted + raw[position:]))
    return cases


def _run_cases(directory: Path) -> dict:
    """The child: every case in process, each under a time limit."""
    import torch

    from lrnn_analysis.checkpoints import CheckpointError, load_checkpoint

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rng = random.Random(SEED)
    native, digest = _native_bytes(directory)
    torch_dict = _torch_bytes(directory, digest)
    cases = [("safetensors", label, data) for label, data in
             _byte_mutations(native, rng, flips=90, cuts=20, inserts=10) + _header_edits(native, rng)]
    cases += [("pt", label, data) for label, data in _byte_mutations(torch_dict, rng, flips=60, cuts=20, inserts=5)]

    def timeout(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, timeout)
    outcomes = {"loaded": 0, "refused": 0}
    failures = []
    for index, (suffix, label, data) in enumerate(cases):
        path = directory / f"case.{suffix}"
        path.write_bytes(data)
        signal.alarm(CASE_SECONDS)
        try:
            loaded = load_checkpoint(path)
            if loaded.sha256 != digest:
                failures.append(f"{index} {suffix} {label}: loaded with hash {loaded.sha256[:12]}")
            outcomes["loaded"] += 1
        except CheckpointError as error:
            message = str(error)
            if len(message.splitlines()) != 1 or not message.startswith(str(path)) or "weights_only" in message:
                failures.append(f"{index} {suffix} {label}: bad message {message[:200]!r}")
            outcomes["refused"] += 1
        except BaseException as error:  # noqa: BLE001 - anything else is the failure under test
            failures.append(f"{index} {suffix} {label}: {type(error).__name__}: {str(error)[:200]}")
        finally:
            signal.alarm(0)
    return {"cases": len(cases), **outcomes, "failures": failures,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM; ru_maxrss would also count the
    pages of a large parent it was forked from, which exec does not reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    print(json.dumps(_run_cases(Path(sys.argv[1]))))
