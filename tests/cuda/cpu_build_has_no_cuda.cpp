// CPU-only code, including the backend tag, must not pull in a CUDA header: this translation
// unit is compiled without the CUDA include directories, so any such include fails the build.
#include <moet/cuda/backend.hpp>
#include <moet/moet.hpp>

#if defined(CUDART_VERSION) || defined(__CUDA_RUNTIME_API_H__) || defined(CUBLASLT_H_)
#error "a CPU header included a CUDA header"
#endif

static_assert(moet::cuda::name[0] == 'c', "the tag is usable from CPU code");
