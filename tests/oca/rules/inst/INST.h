// Entry file of a DFOS-style rule set written for preimg's tests (compiled into
// INST.RLS by the C preprocessor, as DFOS does with <instr>.h).
#include "INST_macros.h"
#include "INST_classification.h"
#include "INST_organisation.h"
#include "INST_association.h"
