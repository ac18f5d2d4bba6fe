"""The host side of evssd: the driver, the store and its backends, the EV-Cache, serving."""
from evssd.host import kernel_cache as _kernel_cache

_kernel_cache.sync()   # before any kernel loads: see evssd.host.kernel_cache
