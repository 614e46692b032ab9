/* keyword lists and conditions shared by the other headers */
#define SETUP DET.DIT,INS.FILT1.NAME
#define SAME_SETUP inputFile.DET.DIT == DET.DIT and inputFile.INS.FILT1.NAME == INS.FILT1.NAME
#define RECENT(days) MJD-OBS > inputFile.MJD-OBS - days and MJD-OBS < inputFile.MJD-OBS + days
#ifndef FLAT_DAYS
#define FLAT_DAYS 3
#endif
