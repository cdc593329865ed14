# Installs moet from BUILD_DIR into a fresh prefix under WORK_DIR, then configures, builds and
# runs the consumer project against it with find_package(moet CONFIG). Where moet was built with
# CUDA, the consumer also builds consumer_cuda against moet::cuda and runs it (exit 77, no
# device here, counts as skipped).
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
                        -DCMAKE_BUILD_TYPE=Release COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/build COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${WORK_DIR}/build/consumer COMMAND_ERROR_IS_FATAL ANY)
if(EXPECT_CUDA AND NOT EXISTS ${WORK_DIR}/build/consumer_cuda)
  message(FATAL_ERROR "moet was built with CUDA but the installed package gave the consumer no moet::cuda")
endif()
if(EXISTS ${WORK_DIR}/build/consumer_cuda)
  execute_process(COMMAND ${WORK_DIR}/build/consumer_cuda RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 AND NOT rc EQUAL 77)
    message(FATAL_ERROR "consumer_cuda failed with exit code ${rc}")
  endif()
endif()
