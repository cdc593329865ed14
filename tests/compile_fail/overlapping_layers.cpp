// Must not compile: one slot holds two mixtures on a common layer (layer 1 is in both lists).
// Per-layer mixtures need disjoint layer lists.
#include <moet/model.hpp>

using namespace moet;
using namespace moet::slot;

#ifdef MOET_COMPILE_FAIL
using Model = Decoder<Llama, Slots<at<q, MoLoRA<2, 4>, layers<0, 1>>, at<q, MoLoRA<8, 4>, layers<1, 2>>>>;
#else
using Model = Decoder<Llama, Slots<at<q, MoLoRA<2, 4>, layers<0, 1>>, at<q, MoLoRA<8, 4>, layers<2, 3>>>>;
#endif

int main() { return Model::name().empty() ? 1 : 0; }
