"""In-place edits of a saved checkpoint's safetensors header, for the tests that corrupt files on purpose."""
import json
import struct

from lrnn_analysis.stability.evidence import METADATA_KEY


def rewrite_header(path, edit=None, record_edit=None):
    """Rewrite ``path``'s header: ``record_edit(record)`` changes the lrnn-analysis metadata
    record, then ``edit(header)`` the header itself; the tensor data stay as they are."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    if record_edit:
        record = json.loads(header["__metadata__"]["lrnn_analysis"])
        record_edit(record)
        header["__metadata__"]["lrnn_analysis"] = json.dumps(record)
    if edit:
        edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])
    return path


def edit_evidence(path, change):
    """``change(evidence)`` on the certificate evidence stored in ``path``'s metadata record."""
    rewrite_header(path, record_edit=lambda record: change(record[METADATA_KEY]))
