// The kernels of grouped.cu, compiled by the host compiler for the CUDA emulation (runtime.cpp).
#include <moet/cuda/kernels/grouped.cu>
