"""Settings shared by the CPU kernels.

FAST is the set of LLVM fast-math flags the kernels use for reductions (dot
products, sums of squares). It allows reassociation, which is what lets LLVM
turn `acc += a[k] * b[k]` into several SIMD accumulators with fused
multiply-adds. It deliberately leaves out `nnan` and `ninf`: with those LLVM
may assume NaN and inf never occur, and a NaN in the input could then vanish
instead of reaching the output.

Starting the thread pool for a `prange` loop costs a few microseconds, more than
the whole work of most operators during decode (one token, a few hundred
floats). Those operators therefore come in two compiled twins, one serial and
one parallel, and the wrapper picks the parallel one only when the array has at
least PARALLEL_MIN_ELEMENTS elements.
"""

FAST = {"reassoc", "contract", "nsz", "arcp"}

PARALLEL_MIN_ELEMENTS = 1 << 15
