"""The fault suite: each fault injected on real components (sshd, rsync, a wire server, a small
tmpfs, real signals), failing on the code before its fix and passing after. One file per family of
faults; each test ends by checking that nothing was lost and nothing incomplete stands under a
final name."""
