"""The process a rank runs in: distributed environment and collectives, stop signals, the watchdog, host memory."""
