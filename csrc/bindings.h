// What each op exposes to Python besides the op itself: its argument checks
// on metadata (for the fake kernels in swa_fast/_<op>_op.py, so torch.compile
// reports bad arguments while tracing as eager mode would), and the launch
// planner (for tests). Each is defined next to the code it exposes and bound
// into swa_fast._C by swa_fast.cpp.
#pragma once

namespace pybind11 {
class module_;
}  // namespace pybind11

namespace swa_fast {

void bind_average(pybind11::module_& m);   // average_args.cpp
void bind_ghost_bn(pybind11::module_& m);  // ghost_bn_args.cpp
void bind_distance(pybind11::module_& m);  // distance_args.cpp
void bind_launch_plan(pybind11::module_& m);  // launch_plan.cpp
void bind_stochastic_block(pybind11::module_& m);  // cpu/stochastic_block.cpp

}  // namespace swa_fast
