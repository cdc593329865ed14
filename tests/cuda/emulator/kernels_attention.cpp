// The kernels of attention.cu, compiled by the host compiler for the CUDA emulation (runtime.cpp).
#include <moet/cuda/kernels/attention.cu>
