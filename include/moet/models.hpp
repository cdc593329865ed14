// moet with pretrained hosts: everything in moet.hpp plus decoder models (GPT-2, Llama), their
// checkpoints (safetensors, config.json, adapter files), generation, and CALM composition.
#pragma once

#include "calm.hpp"
#include "cpu/composition.hpp"
#include "cpu/decoder.hpp"
#include "io/config.hpp"
#include "io/model_io.hpp"
#include "io/safetensors.hpp"
#include "model.hpp"
#include "moet.hpp"
