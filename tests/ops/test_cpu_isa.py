"""The vectorised CPU kernels are built once per instruction set (csrc/common/cpu_isa.h) and the one torch chose
for this CPU runs. The builds for the lower sets this CPU can also run are tested here: the op tests against the
references, rerun in a subprocess with torch, and so epamx, capped at that set (ATEN_CPU_CAPABILITY)."""
import os
import pathlib
import subprocess
import sys

import pytest

import epamx

ISAS = ["DEFAULT", "AVX2", "AVX512"]
HERE = pathlib.Path(__file__).parent
# Every layout, dtype and odd size against the references, the ties and NaNs of the maximum, strided views.
SELECTION = ("(matches_reference or memory_format or ties_nan or non_contiguous or strided_views or gradcheck "
             "or edge_values or silu_sweep or activations_range or thread_count or bit_for_bit or rounding "
             "or without_a_gate or channels_last_forward) "
             "and not cuda")


def _run(isa, *args):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa.lower())
    return subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=1200)


# The set this CPU runs is covered by the other tests; the higher ones cannot run here.
LOWER_ISAS = ISAS[:ISAS.index(epamx.build_info()["cpu_isa"])]


@pytest.mark.parametrize("isa", LOWER_ISAS)
def test_the_kernels_of_a_lower_instruction_set(isa):
    reported = _run(isa, "-c", "import epamx; print(epamx.build_info()['cpu_isa'])")
    assert reported.stdout.strip() == isa, reported.stderr
    result = _run(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECTION,
                  "test_attention_reweight.py", "test_channel_pool.py", "test_batch_norm_act.py",
                  "test_squeeze_excite.py", "test_to_channels_last.py", "test_temporal_shift.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
