// moet: Mixture-of-Experts templates. One include for the whole CPU library:
// specs (Router, Expert, Mixture), their CPU layers, the parameter visitor and AdamW.
#pragma once

#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/param.hpp"
#include "core/random.hpp"
#include "core/tensor.hpp"
#include "core/util.hpp"
#include "core/visit.hpp"
#include "cpu/layers.hpp"
#include "expert.hpp"
#include "mixture.hpp"
#include "optim/adamw.hpp"
#include "optim/clip.hpp"
#include "router.hpp"
