"""torch's CPU kernels pinned to AVX2, as llama.cpp's are by runtime.yaml's llama_cpp_cmake.

torch picks its kernels per machine: ATen's vectorised ops by the CPU's best instruction set
(AVX-512 where there is one), oneDNN and MKL likewise. The bits of a float32 result follow that
choice: on one AVX-512 machine, one epoch of finetune's val_loss was 5.8992048899332685 with
AVX-512 kernels and 5.899205017089844 with AVX2 ones, and eval_parity's logits.max_abs_diff_f16
0.002039 against 0.00204 (`python -m bench.finetune_bits`; the thread count changed neither).
AVX2 is on every x86 machine this project runs on, so pinning it makes the choice the same
everywhere. Import this module before torch (the variables are read when torch first runs a
kernel). Only x86 machines: elsewhere these names mean nothing to torch.
"""

from __future__ import annotations

import os
import platform

PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}

if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.update(PIN)
