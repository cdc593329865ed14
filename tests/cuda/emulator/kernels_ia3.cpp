// The kernels of ia3.cu, compiled by the host compiler for the CUDA emulation (runtime.cpp).
#include <moet/cuda/kernels/ia3.cu>
