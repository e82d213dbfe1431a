"""Fast paths below :mod:`dar.routing.backends`: a recomputing autograd Function and fused Triton
kernels. Nothing here is imported by the method itself except through the backend registry."""
