"""The samples the stages run on: the user's calibration images or arrays (`calibration`), and without
them built-in dead-leaves images (`deadleaves`) refined by model inversion (`inversion`)."""
