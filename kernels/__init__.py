"""Triton kernels of fastad, one module per op. Installed as ``fastad.kernels``
(the ``fastad/kernels`` link); imported lazily by fastad.ops when the triton
backend runs, so that fastad works where triton is missing."""
