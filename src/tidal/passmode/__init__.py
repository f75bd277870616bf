"""HPC pass mode: a pass's rows trained on a device table, moved by difference.

`plan_pass` (CPU) looks a pass's keys up and gives every id a device slot;
`DeviceRows` holds the rows on the device, pools and updates them with index gathers
and adds (`update_rows`: the store's optimizers in torch), and writes them back;
`tidal.runtime.passes` runs a `Trainer`'s run pass by pass (config section `passmode`).
"""

from tidal.passmode.optim import update_rows
from tidal.passmode.plan import ZERO_SLOT, BatchSlots, PassPlan, Residency, TableMove, TableUpdate, plan_pass
from tidal.passmode.rows import DeviceRows

__all__ = ["ZERO_SLOT", "BatchSlots", "DeviceRows", "PassPlan", "Residency", "TableMove", "TableUpdate", "plan_pass",
           "update_rows"]
