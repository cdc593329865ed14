// The kernels of routing.cu, compiled by the host compiler for the CUDA emulation (runtime.cpp).
#include <moet/cuda/kernels/routing.cu>
