"""The one reader of the expert-load histogram format (runtime/expert_load.read_histogram).

What must hold (issue 19): what a run writes reads back; the shorthands read as the
canonical form; a file that is not a histogram of this model, or not a regular file,
or JSON past the input limits, is refused with one line naming the file; and the
reader needs no torch (the compiler uses it where torch is never imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsvc.runtime import expert_load
from dsvc.runtime.expert_load import HistogramError, read_histogram
from dsvc.runtime.inputs import InputError

ROUTED = {1: 4, 2: 4, 3: 4}  # three MoE layers of four experts


def test_what_a_run_writes_reads_back(tmp_path):
    path = tmp_path / "expert_load.json"
    counts = {1: [5.0, 1.0, 0.0, 2.0], 3: [1.0, 1.0, 1.0, 1.0]}
    assert expert_load.write(str(path), counts, 1, 40, 512) is None
    assert read_histogram(str(path), ROUTED) == {1: (5.0, 1.0, 0.0, 2.0), 3: (1.0,) * 4}


@pytest.mark.parametrize("doc", [
    [1, 2, 3, 4],  # every MoE layer
    [[1, 2, 3, 4]] * 3,  # the MoE layers in order
    {"layers.1.mlp": [1, 2, 3, 4], "layers.2": [1, 2, 3, 4], "layers.3": [1, 2, 3, 4]},
    {"format": "dsvc-expert-load", "version": 1, "layers": {"2": [1, 2, 3, 4]},
     "default": [1, 2, 3, 4]},
])
def test_shorthands_read_as_the_canonical_form(tmp_path, doc):
    path = tmp_path / "load.json"
    path.write_text(json.dumps(doc))
    assert read_histogram(str(path), ROUTED) == {layer: (1.0, 2.0, 3.0, 4.0) for layer in ROUTED}


@pytest.mark.parametrize("text, error, says", [
    ('{"layers.0": [1, 1, 1, 1]}', HistogramError, "gives layer 0, which is not a MoE layer"),
    ("[1, 2]", HistogramError, "gives layer 1 as 2 entries; it must list 4"),
    ("[[1, 1, 1, 1]]", HistogramError, "lists 1 histograms; the model has 3 MoE layers"),
    ("[-1, 1, 1, 1]", HistogramError, "is not an expert load histogram"),
    ('{"format": "dsvc-expert-load", "version": 9}', HistogramError, "format version 9"),
    ('{"layers.99999999999": [1, 1, 1, 1]}', HistogramError, "not a MoE layer"),
    ("[" * 1000 + "]" * 1000, InputError, "JSON nested 1000 deep"),
    ("[" + "9" * 5000 + "]", InputError, "a JSON integer of 5000 digits"),
    ("[1e999, 1, 1, 1]", InputError, "not finite"),
])
def test_what_is_not_a_histogram_of_this_model_is_one_line(tmp_path, text, error, says):
    path = tmp_path / "load.json"
    path.write_text(text)
    with pytest.raises(error, match=r"load\.json: ") as info:
        read_histogram(str(path), ROUTED)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "load.json"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        read_histogram(str(fifo), ROUTED)


def test_reading_needs_no_torch():
    code = ("import sys; from dsvc.runtime.expert_load import read_histogram; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "False"
