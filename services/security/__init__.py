"""Who may talk to whom: TLS configuration and flags, router bearer tokens and limits,
the cluster credential workers and routers present to each other, and the throwaway CA
that `slotmesh up --tls` and the tests make."""
