"""Benchmarks, all in one place: trtexec-style timing of an exported detector (``timing``, torch-free), the
PyTorch eager baseline measured in the same run (``torch_eager``), the ``edgead bench`` report (``report``)
and the machine record every figure in ``benchmarks/results/`` carries (``machine``). The scripts in
``benchmarks/`` only drive these and write the records.
"""
