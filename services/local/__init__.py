"""Running slotmesh on one machine: `slotmesh up` (Redis + routers + workers as child
processes), the Redis launcher, and the ready-line / signal helpers every server process
uses to tell its parent it is serving."""
