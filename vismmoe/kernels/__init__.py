"""Hand-written GPU kernels (Triton), each called through one op in vismmoe/ops.py beside its torch twin."""


class HostTensor:
    """A page-locked host tensor as a Triton pointer argument: its (UVA-mapped) address, dtype and strides.
    Triton refuses CPU tensors; the GPU reads this memory over the bus. Keeps the tensor alive."""

    def __init__(self, tensor):
        self.tensor, self.dtype = tensor, tensor.dtype

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    def stride(self, dim: int) -> int:
        return self.tensor.stride(dim)
