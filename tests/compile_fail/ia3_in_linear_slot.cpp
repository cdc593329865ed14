// Must not compile: an IA3 mixture (it scales an activation) placed in a linear slot.
#include <moet/model.hpp>

using namespace moet;
using namespace moet::slot;

#ifdef MOET_COMPILE_FAIL
using Model = Decoder<GPT2, Slots<at<q, MoV<4>>>>;
#else
using Model = Decoder<GPT2, Slots<at<keys, MoV<4>>>>;
#endif

int main() { return Model::name().empty() ? 1 : 0; }
