"""The job store on disk: one folder per job written atomically (the single source of truth
for history), the lock that gives an output folder one owner, the stats log, and `fetch` (a
chunk of a job's file, for clients without the disk). Used by `server/`, `pipeline/` and
`studio/` (`supervision/` takes only the owner lock); its files go through the top-level
`safefs`."""
