// The decoder on the CPU: the model written once in model/decoder.hpp over ops<cpu, T>. Kept as
// a header of its own so that code including it keeps compiling.
#pragma once

#include "../model/decoder.hpp"
#include "ops.hpp"
