"""GPU kernels, written in Triton. Imported only when a Triton path is asked for, so the CPU
install needs no Triton at run time. Each kernel file holds the kernel, its launcher and its
``autograd.Function``; the module wrappers that put them into models are in ``modules.py``.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU through Triton's interpreter: that is
how CI tests them against ``F.conv2d`` on machines without a GPU.
"""
