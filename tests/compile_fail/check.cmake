# Builds a target that must not compile and checks that the compiler says exactly one error,
# and that it is the promised sentence. Arguments: BUILD_DIR, TARGET, MESSAGE.
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target ${TARGET}
                RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(result EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled, but it must not")
endif()
string(FIND "${out}" "${MESSAGE}" where)
if(where EQUAL -1)
  message(FATAL_ERROR "${TARGET} failed without the message '${MESSAGE}':\n${out}")
endif()
string(REGEX MATCHALL "error: " errors "${out}")
list(LENGTH errors count)
if(NOT count EQUAL 1)
  message(FATAL_ERROR "${TARGET}: expected one compiler error, got ${count}:\n${out}")
endif()
message(STATUS "${TARGET}: one error, as promised: ${MESSAGE}")
