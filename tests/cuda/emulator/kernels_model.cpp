// The kernels of model.cu, compiled by the host compiler for the CUDA emulation (runtime.cpp).
#include <moet/cuda/kernels/model.cu>
