# Everything moet needs comes from Debian 12 packages (scripts/install-deps.sh installs them).
include(GNUInstallDirs)

find_package(Eigen3 3.4 REQUIRED NO_MODULE)
find_package(Boost 1.74 REQUIRED)   # header-only: Boost.Hana
if(MOET_OPENMP)
  find_package(OpenMP REQUIRED COMPONENTS CXX)
endif()

if(MOET_BLAS STREQUAL "OPENBLAS")
  # Prefer the OpenMP build of OpenBLAS: it shares moet's OpenMP thread pool, so a GEMM
  # issued between two of moet's parallel loops does not fight a second pool for the cores.
  find_library(MOET_OPENBLAS_LIBRARY NAMES openblas
    HINTS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp
          /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-pthread)
  if(NOT MOET_OPENBLAS_LIBRARY)
    message(FATAL_ERROR "moet: MOET_BLAS=OPENBLAS but libopenblas was not found: "
                        "apt-get install libopenblas-openmp-dev, or configure with -DMOET_BLAS=EIGEN")
  endif()
elseif(NOT MOET_BLAS STREQUAL "EIGEN")
  message(FATAL_ERROR "moet: MOET_BLAS must be OPENBLAS or EIGEN, got '${MOET_BLAS}'")
endif()
