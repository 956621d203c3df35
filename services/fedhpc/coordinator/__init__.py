"""The coordinator service: experiments, sites, rounds and tasks, driven by a scheduling strategy."""
