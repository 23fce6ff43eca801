"""Output tensors that work under numpy 1 and numpy 2 in this Triton build (shared/design/FACTS.md).

Shared by the Python-backend examples (linked into each model's version folder): `pb_utils.Tensor(name,
array)` fails under numpy 2 ("output tensor shape does not match size of output") and `from_dlpack` of a
numpy array fails under numpy 1, so numpy goes one way or the other by version; torch always goes through
its DLPack capsule. BYTES (object arrays) have no DLPack form: they go through `pb_utils.Tensor`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

NUMPY_2 = int(np.__version__.split(".")[0]) >= 2


def output_tensor(name: str, value):
    """A `pb_utils.Tensor` named `name` holding `value` (a numpy array or a torch tensor)."""
    if not isinstance(value, np.ndarray):
        from torch.utils.dlpack import to_dlpack

        return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
    if NUMPY_2 and value.dtype != np.object_:
        # DLPack 0.x cannot mark an array read-only, so numpy refuses to export one (an echoed input): copy it.
        # (The stub logs a "PyCapsule_GetPointer called with incorrect name" ValueError per call and goes on: the
        # output is right. Seen with numpy 2.2 on the CPU.)
        return pb_utils.Tensor.from_dlpack(name, np.require(value, requirements=["C_CONTIGUOUS", "WRITEABLE"]))
    return pb_utils.Tensor(name, np.ascontiguousarray(value))


def input_array(tensor) -> np.ndarray:
    """A numeric input tensor as a numpy array (through DLPack under numpy 2, as outputs go)."""
    return np.from_dlpack(tensor) if NUMPY_2 else tensor.as_numpy()
