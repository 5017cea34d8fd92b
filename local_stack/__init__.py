"""The whole system on one machine: simulators, proxies, the EPP and the development gateway."""
